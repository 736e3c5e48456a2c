"""Compile decode.c on first use and load it with ctypes.

The shared library is cached under ~/.cache/edgefed/native (EDGEFED_NATIVE_CACHE) keyed by the source's
hash, the compiler flags, the compiler binary (path, size, mtime) and the CPU's feature flags (-march=native
code must not run on another CPU). EDGEFED_NATIVE=0, no C compiler, or a failed build: one log line, and
callers use torch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("edgefed.native")

SOURCE = Path(__file__).with_name("decode.c")
FLAGS = ("-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC", "-fno-math-errno")
LIBS = ("-lpthread", "-lm")
BUILD_TIMEOUT_S = 120


class NativeBuildError(RuntimeError):
    """decode.c could not be compiled or loaded (the message names the compiler and its first error)."""


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEFED_NATIVE_CACHE") or Path.home() / ".cache" / "edgefed" / "native")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def compiler() -> str | None:
    cc = os.environ.get("CC")
    return shutil.which(cc) if cc else shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _compiler_id(cc: str) -> str:
    """The compiler binary's identity (resolved path, size, mtime): a new compiler is a new build, and no process
    has to be started to tell (a fork at every start-up, in processes that may already run gRPC threads)."""
    path = os.path.realpath(cc)
    try:
        st = os.stat(path)
    except OSError:
        return path
    return f"{path} {st.st_size} {st.st_mtime_ns}"


def _key(cc: str) -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (" ".join(FLAGS + LIBS), _compiler_id(cc), _cpu_flags()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build(cc: str | None = None, source: Path = SOURCE) -> Path:
    """The cached shared library, compiled now if absent. Raises NativeBuildError."""
    cc = cc or compiler()
    if cc is None:
        raise NativeBuildError("no C compiler found (set CC, or install gcc or clang)")
    out = cache_dir() / f"edgefed_decode-{_key(cc)}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)  # then an atomic rename: concurrent builders are safe
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, "-o", tmp, str(source), *LIBS], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        os.unlink(tmp)
        raise NativeBuildError(f"{cc} failed to run on {source.name}: {e}") from None
    if proc.returncode != 0:
        os.unlink(tmp)
        first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:300])
        raise NativeBuildError(f"{cc} could not compile {source.name} (exit {proc.returncode}): {first}")
    os.replace(tmp, out)
    return out


class EfLinear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("rows", ctypes.c_int32), ("cols", ctypes.c_int32),
                ("group", ctypes.c_int32), ("sdtype", ctypes.c_int32), ("pad_", ctypes.c_int32),
                ("row_stride", ctypes.c_int64), ("data", ctypes.c_void_p),
                ("scales", ctypes.c_void_p), ("zeros", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class EfLayer(ctypes.Structure):
    _fields_ = [("qkv", EfLinear), ("o", EfLinear), ("w13", EfLinear), ("w2", EfLinear),
                ("ln1", ctypes.c_void_p), ("ln2", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("cap", ctypes.c_int64), ("window", ctypes.c_int32), ("pad_", ctypes.c_int32)]


class EfModel(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int32), ("hidden", ctypes.c_int32), ("heads", ctypes.c_int32),
                ("kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32), ("inter", ctypes.c_int32),
                ("vocab", ctypes.c_int32), ("max_pos", ctypes.c_int32), ("eps", ctypes.c_float),
                ("pad_", ctypes.c_int32), ("layers", ctypes.POINTER(EfLayer)), ("embed", ctypes.c_void_p),
                ("embed_rs", ctypes.c_int64), ("embed_cs", ctypes.c_int64),
                ("norm", ctypes.c_void_p), ("head", EfLinear), ("scratch", ctypes.c_void_p)]


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.ef_threads_start.argtypes, lib.ef_threads_start.restype = [i, ctypes.c_long], i
    lib.ef_matmul.argtypes, lib.ef_matmul.restype = [ctypes.POINTER(EfLinear), p, p, i, i], i
    lib.ef_dequant.argtypes, lib.ef_dequant.restype = [ctypes.POINTER(EfLinear), i, i, p, i], i
    lib.ef_model_init.argtypes, lib.ef_model_init.restype = [ctypes.POINTER(EfModel), i], i
    lib.ef_model_free.argtypes, lib.ef_model_free.restype = [ctypes.POINTER(EfModel)], None
    lib.ef_step.argtypes, lib.ef_step.restype = [ctypes.POINTER(EfModel), i, i, p, p, p, p, i], i
    lib.ef_has_avx512.argtypes, lib.ef_has_avx512.restype = [], i
    lib.ef_has_vnni.argtypes, lib.ef_has_vnni.restype = [], i
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library, or None (logged once) when native code is off or cannot be built."""
    if os.environ.get("EDGEFED_NATIVE", "1").strip().lower() in ("0", "off", "false", "no"):
        log.warning("native decode off (EDGEFED_NATIVE=0): using the torch path")
        return None
    try:
        return load(build())
    except (NativeBuildError, OSError) as e:
        log.warning("native decode unavailable, using the torch path: %s", e)
        return None
