"""llama.cpp's side of bench_real that needs no engine: its converter, unpacked from the llama-cpp-python sdist,
and a GGUF's tensor types. Imports nothing heavy (the benchmark's parent process stays torch-free)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


def run_logged(cmd: list[str], log: Path, cwd: Path | None = None, env: dict | None = None) -> None:
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    if r.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        sys.exit(f"command failed (exit {r.returncode}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")


def find_converter(explicit: str | None, src_cache: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py, unpacked (with its conversion/ and gguf-py/) from the sdist of the
    installed llama-cpp-python version, which pip downloads into src_cache once."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            sys.exit(f"--converter {path}: file not found")
        return path
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("llama-cpp-python")
    except PackageNotFoundError:
        sys.exit("llama-cpp-python is not installed: pip install -e '.[bench]' (it builds llama.cpp from source)")
    root = src_cache / f"llama.cpp-{ver}"
    converter = root / "convert_hf_to_gguf.py"
    if converter.is_file():
        return converter
    src_cache.mkdir(parents=True, exist_ok=True)
    sdist = src_cache / f"llama_cpp_python-{ver}.tar.gz"
    if not sdist.is_file():
        print(f"downloading the llama-cpp-python {ver} sdist (for llama.cpp's converter) into {src_cache}",
              file=sys.stderr)
        run_logged([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                    f"llama-cpp-python=={ver}", "-d", str(src_cache)], src_cache / "pip-download.log")
    if not sdist.is_file():
        sys.exit(f"pip did not save {sdist}")
    prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    tmp = Path(tempfile.mkdtemp(dir=src_cache, prefix=".unpack-"))
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted) and (m.isfile() or m.isdir()):
                m.name = m.name[len(prefix):]
                members.append(m)
        tar.extractall(tmp, members=members, filter="data")
    if not (tmp / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"{sdist}: no {prefix}convert_hf_to_gguf.py inside")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return converter


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """Tensor type -> count, and the type of the embedding (the tied head), read with the gguf package."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    embed = "?"
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        if t.name in ("token_embd.weight", "output.weight"):
            embed = f"{t.name}={t.tensor_type.name}" if embed == "?" else f"{embed}, {t.name}={t.tensor_type.name}"
    return {"types": counts, "embedding_head": embed}
