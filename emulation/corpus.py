"""The Python standard library as a text corpus, for the demo model and federated emulation.

The corpus is the ``.py`` sources of the running interpreter's own standard library
(``sysconfig.get_paths()["stdlib"]``): always present, license-clean (PSF License
Agreement), and naturally split into packages that make realistic non-IID clients.

Split rule (deterministic, by module file, never random per run):

* a file is *held out* when ``sha256(relative posix path)`` maps below
  :data:`HELDOUT_FRACTION` (about 5% of files);
* a top-level package that the hash gives no held-out file holds out its
  lowest-hashed file instead, so every package with two or more files has both
  train and held-out files.

Federated API::

    from emulation.corpus import partitions
    parts = partitions(["json", "email"])        # or partitions() for the defaults
    texts = parts["json"].read_texts("train")     # list[str], one per module file

A partition's held-out files are exactly the global held-out files of its package, so a
model trained on ``corpus_files("train")`` has never seen any partition's held-out files.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

Split = Literal["train", "heldout"]

#: Share of module files held out from training (by path hash).
HELDOUT_FRACTION = 0.05

#: Directory names never descended into: third-party code, test suites, build output.
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib-dynload"}
)

#: Top-level packages that are not real library code: pydoc_data is the docs as one
#: string literal (it would swamp a small model with prose), __phello__ is a toy
#: package for testing frozen modules.
EXCLUDED_PACKAGES = frozenset({"pydoc_data", "__phello__"})

#: Default federated clients: well-known packages with distinct vocabularies and styles.
DEFAULT_PARTITIONS: tuple[str, ...] = (
    "asyncio",
    "email",
    "json",
    "unittest",
    "tkinter",
    "xml",
    "http",
    "concurrent",
    "multiprocessing",
    "importlib",
)

_HASH_BUCKETS = 1 << 32


@dataclass(frozen=True)
class Partition:
    """One federated client's data: the module files of one standard-library package."""

    name: str
    train_files: tuple[Path, ...]
    heldout_files: tuple[Path, ...]

    def files(self, split: Split = "train") -> tuple[Path, ...]:
        """The partition's files of ``split`` ("train" or "heldout"), sorted by path."""
        _check_split(split)
        return self.train_files if split == "train" else self.heldout_files

    def read_texts(self, split: Split = "train") -> list[str]:
        """The source text of each file of ``split``, in :meth:`files` order."""
        return [read_source(path) for path in self.files(split)]

    def num_bytes(self, split: Split = "train") -> int:
        """Total UTF-8 size of ``split``, handy for weighting clients in federated averaging."""
        return sum(path.stat().st_size for path in self.files(split))


def stdlib_root() -> Path:
    """Directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def read_source(path: Path) -> str:
    """Read one corpus file as UTF-8 text (corpus files are pre-checked to decode)."""
    return path.read_text(encoding="utf-8")


def corpus_files(split: Split = "train", root: Path | None = None) -> tuple[Path, ...]:
    """All corpus files of ``split`` under ``root`` (default :func:`stdlib_root`), sorted by path."""
    _check_split(split)
    root = _resolve_root(root)
    heldout = _heldout_relpaths(root)
    want_heldout = split == "heldout"
    return tuple(root / rel for rel in _discover(root) if (rel in heldout) == want_heldout)


def relative_name(path: Path, root: Path | None = None) -> str:
    """``path`` relative to the corpus root in posix form, e.g. ``"json/decoder.py"``."""
    return path.resolve().relative_to(_resolve_root(root)).as_posix()


def partition_names(root: Path | None = None) -> tuple[str, ...]:
    """Every package usable as a partition: it has at least one train and one held-out file."""
    root = _resolve_root(root)
    return tuple(name for name, (train, held) in _package_split(root).items() if train and held)


def partitions(names: Iterable[str] | None = None, root: Path | None = None) -> dict[str, Partition]:
    """Non-IID client partitions keyed by package name.

    ``names`` defaults to :data:`DEFAULT_PARTITIONS` (those present on this interpreter).
    Raises ValueError naming the known partitions when a requested name is not one.
    """
    root = _resolve_root(root)
    known = partition_names(root)
    if names is None:
        wanted: Sequence[str] = [name for name in DEFAULT_PARTITIONS if name in known]
    else:
        wanted = [names] if isinstance(names, str) else list(names)
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ValueError(
            f"unknown corpus partition(s) {', '.join(map(repr, unknown))}; "
            f"known partitions on Python {sysconfig.get_python_version()}: {', '.join(known)}"
        )
    split = _package_split(root)
    return {
        name: Partition(
            name=name,
            train_files=tuple(root / rel for rel in split[name][0]),
            heldout_files=tuple(root / rel for rel in split[name][1]),
        )
        for name in wanted
    }


def _check_split(split: str) -> None:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")


def _resolve_root(root: Path | None) -> Path:
    return stdlib_root() if root is None else Path(root).resolve()


def _path_hash(rel: str) -> int:
    # sha256 rather than hash(): Python's str hash is salted per process.
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:4], "big")


def _package_of(rel: str) -> str | None:
    """Top-level package of a relative path, or None for a top-level single-file module."""
    head, sep, _ = rel.partition("/")
    return head if sep else None


@lru_cache(maxsize=8)
def _discover(root: Path) -> tuple[str, ...]:
    """Relative posix paths of every usable .py file under ``root``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends into site-packages or test suites.
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for filename in filenames:
            path = Path(dirpath, filename)
            rel_parts = path.relative_to(root).parts
            if not filename.endswith(".py") or _excluded(rel_parts) or not path.is_file():
                continue
            text = _try_read(path)
            # Empty __init__.py files teach nothing; generated codec tables are data.
            if text is None or not text.strip() or _is_generated(text):
                continue
            found.append("/".join(rel_parts))
    return tuple(sorted(found))


def _excluded(parts: tuple[str, ...]) -> bool:
    dirs = parts[:-1]
    if any(part in EXCLUDED_DIRS for part in dirs):
        return True
    if dirs and (dirs[0] in EXCLUDED_PACKAGES or dirs[0].startswith("config-")):
        return True  # config-3.x-<platform> holds the interpreter's build files
    return parts[-1].startswith("_sysconfigdata_")  # machine-written build settings


def _try_read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _is_generated(text: str) -> bool:
    # encodings/cp*.py and friends start with gencodec's banner; they are byte tables.
    return "with gencodec.py" in text[:400]


@lru_cache(maxsize=8)
def _heldout_relpaths(root: Path) -> frozenset[str]:
    files = _discover(root)
    threshold = int(HELDOUT_FRACTION * _HASH_BUCKETS)
    heldout = {rel for rel in files if _path_hash(rel) < threshold}
    by_package: dict[str, list[str]] = {}
    for rel in files:
        package = _package_of(rel)
        if package is not None:
            by_package.setdefault(package, []).append(rel)
    for members in by_package.values():
        # Guarantee every multi-file package a held-out file, so each can be a client.
        if len(members) >= 2 and not heldout.intersection(members):
            heldout.add(min(members, key=_path_hash))
    return frozenset(heldout)


@lru_cache(maxsize=8)
def _package_split(root: Path) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """package -> (train relpaths, held-out relpaths), packages in sorted order."""
    heldout = _heldout_relpaths(root)
    split: dict[str, tuple[list[str], list[str]]] = {}
    for rel in _discover(root):
        package = _package_of(rel)
        if package is not None:
            train, held = split.setdefault(package, ([], []))
            (held if rel in heldout else train).append(rel)
    return {name: (tuple(train), tuple(held)) for name, (train, held) in sorted(split.items())}
