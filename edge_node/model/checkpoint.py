"""Safetensors checkpoints read tensor by tensor, with their headers checked first.

A single model.safetensors or sharded model-*.safetensors with model.safetensors.index.json.
Headers are parsed and checked against the file size before any tensor is read, so a
truncated or corrupt file is named up front instead of failing deep inside a load.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError

_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = _DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; every tensor must lie inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (hlen,) = struct.unpack("<Q", raw_len)
            if hlen > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header (claims {hlen} bytes)")
            header = json.loads(f.read(hlen))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    data_bytes = size - 8 - hlen
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = meta.get("dtype"), tuple(meta.get("shape", ())), meta.get("data_offsets", (0, 0))
        if dtype not in _DTYPE_BYTES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        info = TensorInfo(path, dtype, shape)
        if end - begin != info.nbytes or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} offsets disagree with its shape {list(shape)}")
        if end > data_bytes:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} but the file holds {data_bytes} data bytes"
            )
        out[name] = info
    return out


class Checkpoint:
    """All tensors of a checkpoint directory, read lazily one at a time."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        for path in self._files():
            self.tensors.update(read_header(path))
        self._handles: dict[Path, object] = {}

    def _files(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: corrupt index (expected a JSON object with 'weight_map')") from None
            files = sorted({self.dir / f for f in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index}: lists missing file(s) {', '.join(missing)}")
            return files
        if single.is_file():
            return [single]
        found = sorted(self.dir.glob("*.safetensors"))
        if found:
            return found
        raise CheckpointError(f"{self.dir}: no model.safetensors, model.safetensors.index.json or *.safetensors found")

    def names(self) -> set[str]:
        return set(self.tensors)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            try:
                handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{info.file}: cannot open as safetensors ({e})") from None
        try:
            t = handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r} ({e})") from None
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def close(self) -> None:
        self._handles.clear()
