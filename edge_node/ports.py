"""A free TCP port, for a listener that binds it a moment later (rendezvous, serving, SuperLink). Torch-free."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now ("" : on every interface of this host)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
