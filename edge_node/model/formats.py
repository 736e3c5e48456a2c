"""The file formats edgefed reads and writes, in one place: safetensors headers, tensors, streaming writes, sha256.

Checkpoint loading, the sharder and the sliding-window reader all go through here, so a header is
validated the same way (every tensor inside the file, offsets matching shape and dtype) whether it is
read from disk or parsed in a buffer that was just read, and a checksum mismatch reads the same everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .checksum import ChecksumError, sha256_file  # torch-free (the device agent uses them); re-exported here
from .errors import CheckpointError

# safetensors dtype name -> torch dtype (None: known to safetensors but not computed with here)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# the names edgefed's own files (manifests, CLI flags) use for the dtypes they store
TORCH_NAMES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                       "float16": torch.float16, "int8": torch.int8}


def torch_name(st_dtype: str) -> str:
    """A safetensors dtype name as edgefed's files spell it ("F32" -> "float32")."""
    return {v: k for k, v in TORCH_NAMES.items()}[DTYPES[st_dtype]]


_MAX_HEADER = 100 * 1024 * 1024


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype name."""
    return DTYPES[dtype].itemsize


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors name, e.g. "F32"
    shape: tuple[int, ...]
    begin: int = 0  # data offsets, relative to the start of the data section
    end: int = 0
    data_start: int = 0  # where the data section starts in the file (8 + header length)

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


def _check_header(header: object, path: Path, data_bytes: int, data_start: int) -> dict[str, TensorInfo]:
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: tensor {name!r} has a corrupt header entry")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape", ()), meta.get("data_offsets", (0, 0))
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{path}: tensor {name!r} has a corrupt shape or data_offsets")
        info = TensorInfo(path, dtype, tuple(shape), offsets[0], offsets[1], data_start)
        if info.end - info.begin != info.nbytes or info.begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} offsets disagree with its shape {list(shape)}")
        if info.end > data_bytes:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {info.end} but the file "
                                  f"holds {data_bytes} data bytes")
        out[name] = info
    return out


def _header_length(raw: bytes, size: int, path: Path) -> int:
    if len(raw) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    (hlen,) = struct.unpack("<Q", raw[:8])
    if hlen > min(_MAX_HEADER, size - 8):
        raise CheckpointError(f"{path}: corrupt or truncated safetensors header (claims {hlen} bytes)")
    return hlen


def _json(raw: bytes, path: Path) -> object:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors file's header; every tensor must lie inside the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            hlen = _header_length(f.read(8), size, path)
            header = _json(f.read(hlen), path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    return _check_header(header, path, size - 8 - hlen, 8 + hlen)


def read_rows(info: TensorInfo, fd: int, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of a tensor (along its first dimension), read like read_tensor."""
    row = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
    part = TensorInfo(info.file, info.dtype, (r1 - r0, *info.shape[1:]), info.begin + r0 * row,
                      info.begin + r1 * row, info.data_start)
    return read_tensor(part, fd)


def read_tensor(info: TensorInfo, fd: int) -> torch.Tensor:
    """One tensor read (pread) from an open file into memory of its own.

    No mapping of the file outlives the call, so the page cache the bytes pass through is never counted in
    this process's RSS (tensors that are views into a mapped file keep every touched page of it resident:
    loading through mmap cost 2x the weights in RSS).
    """
    t = torch.empty(info.shape, dtype=DTYPES[info.dtype])
    view = memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")
    done, offset = 0, info.data_start + info.begin
    while done < info.nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{info.file}: truncated while reading tensor data at byte {offset + done}")
        done += n
    return t


def parse_buffer(buf: torch.Tensor, path: str | Path = "<buffer>") -> dict[str, torch.Tensor]:
    """Tensors as views into a uint8 buffer holding a whole safetensors file (copies only if misaligned).

    The header is validated exactly as `read_header` does for a file on disk.
    """
    path = Path(path)
    size = buf.numel()
    hlen = _header_length(bytes(buf[:8].numpy()), size, path)
    infos = _check_header(_json(bytes(buf[8: 8 + hlen].numpy()), path), path, size - 8 - hlen, 8 + hlen)
    base = 8 + hlen
    out: dict[str, torch.Tensor] = {}
    for name, info in infos.items():
        dtype = DTYPES[info.dtype]
        raw = buf[base + info.begin: base + info.end]
        if (base + info.begin) % dtype.itemsize:
            raw = raw.clone()  # safetensors aligns by dtype order, so this is rare
        out[name] = raw.view(dtype).reshape(info.shape)
    return out


# A tensor to stream: (name, safetensors dtype, shape, parts) where parts() yields its row chunks in order.
Entry = tuple[str, str, Sequence[int], Callable[[], Iterable[torch.Tensor]]]


def write_streaming(path: Path, entries: Sequence[Entry]) -> dict[str, dict]:
    """A safetensors file whose tensors are written piece by piece; returns its header.

    The header is computed from the shapes first, then each tensor's parts are appended, so a tensor
    bigger than memory (an embedding table) can be written from row chunks.
    """
    header, offset = {}, 0
    for name, dtype, shape, _ in entries:
        n = itemsize(dtype)
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 64)  # data starts 64-byte aligned (safetensors pads the header too)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, _, _, parts in entries:
            written = 0
            for part in parts():
                data = part.contiguous().view(torch.uint8).numpy().tobytes()
                f.write(data)
                written += len(data)
            begin, end = header[name]["data_offsets"]
            if written != end - begin:
                raise CheckpointError(f"{path}: wrote {written} bytes for {name!r}, expected {end - begin}")
    return header


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """A safetensors file of whole tensors: 1-byte tensors first, then wider ones by size.

    With the 64-byte aligned data start, int8 weights land on 64-byte boundaries in a read buffer
    (the int8 kernel reads them with aligned vector loads) and float tensors stay aligned.
    """
    order = sorted(tensors, key=lambda n: (tensors[n].element_size() != 1, -tensors[n].element_size(), n))
    return write_streaming(path, [(n, ST_NAMES[tensors[n].dtype], tuple(tensors[n].shape),
                                   lambda x=tensors[n]: [x]) for n in order])


def check_sha256(path: str | Path, got: str, expected: str) -> None:
    """The one checksum comparison: raise ChecksumError naming the file when `got` differs from `expected`."""
    if got != expected:
        raise ChecksumError(f"{path}: sha256 {got[:16]}... does not match the manifest's {expected[:16]}...")


def verify_sha256(path: Path, expected: str) -> None:
    """Hash a whole file and compare (files streamed by the window verify as they are read instead)."""
    check_sha256(path, sha256_file(path), expected)


def weights_digest(model_dir: str | Path) -> str:
    """sha256 over what a model directory's weights are: config.json's bytes and, per *.safetensors file (and
    the sharded index), its name, size and the sha256 of its contents.

    Hashing the files rather than the loaded tensors: it needs no model in memory (a caller holding a shard
    directory or only a path can compute it), is independent of the dtype and the (packed) layout the runtime
    loads into, and equals the digest of any byte-identical copy of the checkpoint. It reads every weight byte
    once per call (measured on a loaded 2-core x86 VM: 10-30 ms for the 13 MB demo model, 0.45-0.55 s for
    500 MiB from the page cache, 1.1 s from disk), small beside loading or exporting such a model, and callers
    hash right after load_model read the same files. Names, sizes or mtimes alone would miss what this guards
    against: a fine-tuned copy of the same shapes written over the checkpoint.
    """
    d = Path(model_dir)
    config = d / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{config}: not found")
    h = hashlib.sha256(b"edgefed-weights-1\0")
    h.update(hashlib.sha256(config.read_bytes()).digest())
    index = d / "model.safetensors.index.json"
    files = sorted(d.glob("*.safetensors")) + ([index] if index.is_file() else [])
    for f in files:
        h.update(f"{f.name}\0{f.stat().st_size}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def prepare_out_dir(out: Path, source: Path, force: bool, stale: Callable[[Path], bool],
                    error: type[Exception] = CheckpointError) -> None:
    """Create an output directory for files derived from `source`, refusing `source` itself, a path that is
    or lies under a file, an unwritable place, and a non-empty directory (whose stale files would mix with
    the new ones) unless `force`, which first removes the entries `stale(path)` picks: those an earlier run
    of the same command wrote, never anything else."""
    if out.resolve() == source.resolve():
        raise error(f"--out {out} is the model directory itself: write into a directory of its own")
    if out.exists() and not out.is_dir():
        raise error(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise error(f"--out {out} exists and is not empty: choose a new directory or pass --force")
        for child in filter(stale, list(out.iterdir())):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".edgefed-write-test"
        probe.touch()
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise error(f"--out {out}: a parent of it is a file") from None
    except OSError as e:
        raise error(f"--out {out}: cannot write there ({e.strerror})") from None
