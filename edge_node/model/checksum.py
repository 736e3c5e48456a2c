"""sha256 of a file and the error for a mismatch, without torch: the device agent (`edgefed node`) verifies
fetched shard files with these and must stay light. edge_node.model.formats re-exports both."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import CheckpointError

_CHUNK = 1 << 24  # hash in 16 MiB pieces


class ChecksumError(CheckpointError):
    """A file's sha256 differs from the one recorded for it."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()
