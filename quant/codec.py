"""Hidden-state transfer codec for the edge -> cloud link (CE-CoLLM's uplink).

An edge sends the layer-k hidden states of its tokens, (S, hidden), to the cloud tier. float16 halves the
bytes of float32 (the default); int8 stores each token's row as int8 codes with one float32 scale per token
(absmax / 127), a quarter of float32 plus 4 bytes a token. float32 is lossless, for exact comparisons.
The payload is plain bytes so any transport (gRPC, a socket, in-process) carries it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edge_node.model.errors import EdgefedError

CODECS = ("float16", "int8", "float32")
DEFAULT_CODEC = "float16"
_FLOAT = {"float16": torch.float16, "float32": torch.float32}


class CodecError(EdgefedError):
    """A hidden-state payload that cannot be decoded (unknown codec, wrong size, non-finite values)."""


@dataclass(frozen=True)
class Encoded:
    """S tokens' hidden states as bytes: `data` row-major (rows, cols); `scales` one float32 per row for int8."""

    codec: str
    rows: int
    cols: int
    data: bytes
    scales: bytes = b""

    @property
    def nbytes(self) -> int:
        """Bytes on the wire for the tensor payload (codes and scales)."""
        return len(self.data) + len(self.scales)


def check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise CodecError(f"unknown hidden-state codec {codec!r}: expected one of {', '.join(CODECS)}")
    return codec


def encode(h: torch.Tensor, codec: str = DEFAULT_CODEC) -> Encoded:
    """h (S, hidden) in any float dtype -> Encoded; the values must be finite."""
    check_codec(codec)
    if h.dim() != 2:
        raise CodecError(f"hidden states to encode must be (tokens, hidden), got shape {list(h.shape)}")
    x = h.detach().float()
    if not bool(torch.isfinite(x).all()):
        raise CodecError("hidden states to encode hold NaN or Inf")
    rows, cols = x.shape
    if codec in _FLOAT:
        return Encoded(codec, rows, cols, _bytes(x.to(_FLOAT[codec])))
    scale = x.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (S,): one scale per token
    codes = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (S, hidden)
    return Encoded(codec, rows, cols, _bytes(codes), _bytes(scale))


def decode(enc: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Encoded -> (rows, cols) tensor in `dtype`; a payload of the wrong size is a named error."""
    check_codec(enc.codec)
    if enc.rows < 0 or enc.cols <= 0:
        raise CodecError(f"hidden-state payload has an invalid shape ({enc.rows}, {enc.cols})")
    n = enc.rows * enc.cols
    if enc.codec in _FLOAT:
        x = _tensor(enc.data, _FLOAT[enc.codec], n, "data", enc).float()
    else:
        codes = _tensor(enc.data, torch.int8, n, "data", enc).float()
        scale = _tensor(enc.scales, torch.float32, enc.rows, "scales", enc)
        x = codes.view(enc.rows, enc.cols) * scale[:, None]
    x = x.view(enc.rows, enc.cols)
    if not bool(torch.isfinite(x).all()):
        raise CodecError(f"{enc.codec} hidden-state payload decodes to NaN or Inf")
    return x.to(dtype)


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _tensor(raw: bytes, dtype: torch.dtype, count: int, field: str, enc: Encoded) -> torch.Tensor:
    want = count * dtype.itemsize
    if len(raw) != want:
        raise CodecError(f"{enc.codec} hidden-state payload field {field!r} holds {len(raw)} bytes, "
                         f"({enc.rows}, {enc.cols}) needs {want}")
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype)
