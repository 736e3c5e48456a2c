"""Typed control messages between tensor-parallel ranks; the tensors they announce travel separately, raw.

Ranks swap fixed-size frames through collectives, so a message must fit in FRAME_BYTES: a 6-byte header (version u8,
kind u8, payload length u32 little-endian), then the fields as compact UTF-8 JSON, zero-padded by `to_frame`.
Types are checked from the dataclass annotations when a message is built and when one is decoded, so a message that
exists is valid on sender and receiver alike, and a new field needs no change anywhere else.
"""

from __future__ import annotations

import functools
import json
import struct
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from edge_node.model.errors import EdgefedError

VERSION = 1
FRAME_BYTES = 4096
_HEADER = struct.Struct("<BBI")  # version, kind, payload length
HEADER_BYTES = _HEADER.size


class ProtocolError(EdgefedError):
    """A frame or message breaks the protocol; ranks running different code must fail loudly, not misrun layers."""


# Exact checks per wire type; bool is a subclass of int in Python, so each excludes the other explicitly.
_SCALARS: dict[Any, Callable[[Any], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    type(None): lambda v: v is None,
}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against the annotation `hint`, returning its canonical form (tuple for list, float for int)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _coerce(value, arm, where)
            except ProtocolError:
                pass
    elif origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis and isinstance(value, list | tuple):
            args = (args[0],) * len(value)
        if isinstance(value, list | tuple) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    elif hint in _SCALARS:
        if _SCALARS[hint](value):
            return float(value) if hint is float else value
    else:
        raise TypeError(f"{where}: annotation {hint!r} is not a supported wire type")
    shown = hint.__name__ if hint in _SCALARS else str(hint)
    raise ProtocolError(f"{where}: expected {shown}, got {type(value).__name__} {value!r:.40}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a message's fields, computed once per class."""
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved[f.name] for f in fields(cls)}


class _Message:
    """Shared construction checks: types from the annotations, then the class's own value checks."""

    def __post_init__(self) -> None:
        for name, hint in _hints(type(self)).items():
            value = _coerce(getattr(self, name), hint, f"{type(self).__name__}.{name}")
            object.__setattr__(self, name, value)  # frozen: canonical forms keep equality and hashing exact
        self._validate()

    def _validate(self) -> None:
        """Value checks beyond the types; a message with constraints overrides this."""

    def _non_negative(self, *names: str) -> None:
        """Counts and positions below zero would index before the start of a sequence or a buffer."""
        for name in names:
            if getattr(self, name) < 0:
                raise ProtocolError(f"{type(self).__name__}.{name}: must be >= 0, got {getattr(self, name)}")

    def _layer_range(self, layers: tuple[int, int]) -> None:
        """A half-open [a, b) range; a reversed one would silently run no layers."""
        if not 0 <= layers[0] <= layers[1]:
            raise ProtocolError(f"{type(self).__name__}.layers: need 0 <= a <= b for [a, b), got {layers}")


@dataclass(frozen=True)
class Step(_Message):
    """Run `tokens` positions from absolute position `pos0` through layers [a, b); the hidden states follow.

    `exited` marks a token that left at an early exit (deep layers catch up later); `adapter` names a LoRA
    adapter, None for the base model. In an early-exit sequence (see Reset.exit_end) a Step from layer 0 is a
    new chunk (its hidden states follow), one from a later layer continues the last chunk, `tokens=0` only
    catches up deferred positions, and `exited` keeps the last chunk waiting (nothing runs).
    """

    tokens: int = 1
    pos0: int = 0
    layers: tuple[int, int] = (0, 0)
    all_logits: bool = False
    exited: bool = False
    adapter: str | None = None

    def _validate(self) -> None:
        self._non_negative("tokens", "pos0")
        self._layer_range(self.layers)


@dataclass(frozen=True)
class KVTransfer(_Message):
    """Rank 0 is about to send each rank its KV-head slice of the prompt's K and V: `length` positions, [a, b)."""

    length: int = 0
    layers: tuple[int, int] = (0, 0)

    def _validate(self) -> None:
        self._non_negative("length")
        self._layer_range(self.layers)


@dataclass(frozen=True)
class Stop(_Message):
    """Rank 0 ends the session; `reason` is for the logs."""

    reason: str = "done"


@dataclass(frozen=True)
class RankStats(_Message):
    """What a rank reports to rank 0 at the end, so rank 0 can print one summary for the whole group."""

    rank: int = 0
    peak_rss_mb: float = 0.0
    bytes_read: int = 0
    bytes_per_pass: int = 0
    window: int = 0
    disk_read_bytes: int = 0
    config_sha256: str = ""

    def _validate(self) -> None:
        self._non_negative("rank", "peak_rss_mb", "bytes_read", "bytes_per_pass", "window", "disk_read_bytes")


@dataclass(frozen=True)
class Reset(_Message):
    """A serving group starts a new sequence: every rank empties its KV cache (buffers kept) before the next
    Step, which runs from position 0. `request` names the request, for the logs. `exit_end` > 0: the sequence runs
    with early exit on the edge layers [0, exit_end) (edge_node.early_exit.DeferredStack on every rank); its Steps
    then name layer ranges within them, and `exited` Steps keep the last chunk for deep-KV catch-up."""

    request: str = ""
    exit_end: int = 0

    def _validate(self) -> None:
        self._non_negative("exit_end")


@dataclass(frozen=True)
class Ping(_Message):
    """Rank 0 is alive and idle: a serving rank's wait for the next message starts over (every wait on rank 0
    keeps its timeout, so an idle group needs a message more often than that)."""


Message = Step | KVTransfer | Stop | RankStats | Reset | Ping

# The one registry of kind numbers. They are wire format: never renumber, only append.
_KINDS: dict[int, type] = {1: Step, 2: KVTransfer, 3: Stop, 4: RankStats, 5: Reset, 6: Ping}
_KIND_OF: dict[type, int] = {cls: kind for kind, cls in _KINDS.items()}
MESSAGE_TYPES: tuple[type, ...] = tuple(_KINDS.values())


def encode(msg: Message) -> bytes:
    """Header plus compact JSON payload; refused here, on the sender, if it could not fit in one frame."""
    kind = _KIND_OF.get(type(msg))
    if kind is None:
        raise ProtocolError(f"cannot encode {type(msg).__name__}: not one of {[c.__name__ for c in MESSAGE_TYPES]}")
    body = {f.name: getattr(msg, f.name) for f in fields(msg)}
    try:
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except ValueError as e:  # NaN or infinity, which JSON cannot carry
        raise ProtocolError(f"cannot encode {type(msg).__name__}: {e}") from None
    size = HEADER_BYTES + len(payload)
    if size > FRAME_BYTES:
        raise ProtocolError(f"{type(msg).__name__} encodes to {size} bytes, more than the {FRAME_BYTES}-byte frame")
    return _HEADER.pack(VERSION, kind, len(payload)) + payload


def to_frame(msg: Message) -> bytes:
    """`encode(msg)` zero-padded to exactly FRAME_BYTES, the fixed size collectives exchange."""
    return encode(msg).ljust(FRAME_BYTES, b"\0")


def decode(buf: bytes | bytearray | memoryview) -> Message:
    """Parse one frame; bytes after the declared payload (a fixed frame's padding) are ignored."""
    data = bytes(buf)
    if len(data) < HEADER_BYTES:
        raise ProtocolError(f"truncated frame: {len(data)} bytes, shorter than the {HEADER_BYTES}-byte header")
    version, kind, length = _HEADER.unpack_from(data)
    if version != VERSION:
        raise ProtocolError(f"protocol version mismatch: received version {version}, this node speaks {VERSION}")
    cls = _KINDS.get(kind)
    if cls is None:
        known = ", ".join(f"{k}={c.__name__}" for k, c in _KINDS.items())
        raise ProtocolError(f"unknown message kind {kind} (known: {known})")
    if length > FRAME_BYTES - HEADER_BYTES:
        raise ProtocolError(f"oversized {cls.__name__}: header declares {length} payload bytes, "
                            f"at most {FRAME_BYTES - HEADER_BYTES} fit in a {FRAME_BYTES}-byte frame")
    if length > len(data) - HEADER_BYTES:
        raise ProtocolError(f"truncated {cls.__name__} frame: header declares {length} payload bytes, "
                            f"only {len(data) - HEADER_BYTES} present")
    return _build(cls, data[HEADER_BYTES:HEADER_BYTES + length])


def _build(cls: type, payload: bytes) -> Message:
    """Every field must be present: a rank sending a different field set runs different code, so refuse it."""
    try:
        body = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"{cls.__name__} payload is not UTF-8 JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{cls.__name__} payload must be a JSON object, got {type(body).__name__}")
    names = set(_hints(cls))
    problems = [f"{what} fields: {', '.join(sorted(keys))}"
                for what, keys in (("missing", names - body.keys()), ("unexpected", body.keys() - names)) if keys]
    if problems:
        raise ProtocolError(f"{cls.__name__}: {'; '.join(problems)}")
    return cls(**body)
