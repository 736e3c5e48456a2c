"""Sliding-window memory scheduler: at most W shard files (layer blocks) resident, the next ones prefetched.

A background thread reads the rank's stream files in order, cyclically (after the last block of a token
it goes on with block 0 of the next token), while the consumer computes the current block and waits on
the allreduce. The thread may only run ahead while fewer than W blocks are resident, so resident weight
bytes never exceed W x the biggest block. A block is released as soon as the consumer moves past it.
When W >= 3 but not everything fits, the first W-2 blocks are pinned (read once, kept) and the rest
stream through 2 slots (one computing, one prefetching): the same bound, fewer bytes read per token.

Each file is read with plain read(2) into an anonymous mapping, hashed on its first read (sha256
against the manifest), and parsed in place: tensors are views into the mapping, so a block costs its
file size once. Streaming slots reuse their mappings (no page faults or zeroing per block); a released
block's parameters are emptied first, so no view outlives the reuse. Mappings of blocks that are
dropped for good are unmapped, so that memory returns to the OS. With `drop_page_cache` each file's
pages are evicted after reading (posix_fadvise DONTNEED): every pass really comes from the device and
no page cache stays charged to the rank's cgroup.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from edge_node.model.errors import EdgefedError
from edge_node.model.formats import ChecksumError, check_sha256, parse_buffer
from edge_node.shard import ShardFile

_CHUNK = 1 << 24  # hash and read in 16 MiB pieces so hashing overlaps nothing but stays cache-friendly
_POLL_S = 0.2


def own_peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Unlike getrusage's ru_maxrss, which Linux carries across
    fork + exec, it does not report a big parent's RSS for a small child that it launched."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemoryBudgetError(EdgefedError):
    """The memory budget cannot hold even one block next to the runtime and KV cache."""


class ShardReader:
    """Reads shard files into owned buffers; verifies each file's sha256 the first time it is read."""

    def __init__(self, drop_page_cache: bool = False):
        self.drop_page_cache = drop_page_cache
        self.verified: set[str] = set()
        self.bytes_read = 0

    def read(self, f: ShardFile, region: mmap.mmap | None = None) -> dict[str, torch.Tensor]:
        """The file's tensors as views into `region` (an anonymous mapping; a new one of the file's size
        by default). A mapping is unmapped when the last view into it dies, so memory really returns to
        the OS (malloc would keep blocks under its mmap threshold); the window reuses its W mappings."""
        region = mmap.mmap(-1, f.bytes) if region is None else region
        view = memoryview(region)[: f.bytes]
        check = str(f.path) not in self.verified
        h = hashlib.sha256() if check else None
        fd = os.open(f.path, os.O_RDONLY)
        try:
            done = 0
            while done < f.bytes:
                n = os.readv(fd, [view[done: done + _CHUNK]])
                if n == 0:
                    raise ChecksumError(f"{f.path}: file is shorter than the manifest's {f.bytes} bytes")
                if h is not None:
                    h.update(view[done: done + n])
                done += n
            if self.drop_page_cache:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        self.bytes_read += f.bytes
        if h is not None:
            check_sha256(f.path, h.hexdigest(), f.sha256)
            self.verified.add(str(f.path))
        view.release()
        return parse_buffer(torch.frombuffer(region, dtype=torch.uint8, count=f.bytes), f.path)


def window_for_budget(memory_bytes: int, block_bytes: int, fixed_bytes: int, blocks: int) -> int:
    """Blocks that fit in `memory_bytes` after `fixed_bytes` (runtime, KV cache, activations); at most all."""
    room = memory_bytes - fixed_bytes
    w = room // block_bytes if block_bytes else blocks
    if w < 1:
        raise MemoryBudgetError(
            f"a memory budget of {memory_bytes / 2**20:.0f} MiB leaves {room / 2**20:.0f} MiB after "
            f"{fixed_bytes / 2**20:.0f} MiB of runtime and KV cache: not enough for one "
            f"{block_bytes / 2**20:.0f} MiB block")
    return int(min(w, blocks))


def drop_tensors(item: Any) -> None:
    """Point every parameter of a module (or tensor of a dict) at an empty tensor, freeing its storage."""
    if isinstance(item, torch.nn.Module):
        for p in item.parameters():
            p.data = torch.empty(0, dtype=p.dtype)
    elif isinstance(item, dict):
        item.clear()


class SlidingWindow:
    """Feeds blocks built from `files` in order, cyclically, keeping at most `window` resident.

    window=None (or >= len(files)) loads everything once and keeps it. `build(file, tensors)` turns a
    file's tensors into what the consumer runs (a Block, a head chunk).
    """

    def __init__(self, files: list[ShardFile], build: Callable[[ShardFile, dict], Any], window: int | None,
                 reader: ShardReader | None = None, drop: Callable[[Any], None] | None = None):
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.files, self.build, self.drop = files, build, drop or drop_tensors
        self.reader = reader or ShardReader()
        self.window = len(files) if window is None else min(window, len(files))
        self.io_wait_s = 0.0
        self.resident = 0  # blocks read and not yet released (accounting the tests check)
        self.peak_resident = 0
        self._next = 0  # index into files of the next block the consumer takes
        self._lock = threading.Lock()
        self._all: list[Any] | None = None
        self._thread: threading.Thread | None = None
        self._pool: list[mmap.mmap] = []  # free block-sized mappings (at most `window` exist)
        self._regions: dict[int, mmap.mmap] = {}  # id(block) -> its mapping
        self._region_bytes = max(f.bytes for f in files)
        # With room for 3+ blocks but not all, the first W-2 stay resident for good and the rest stream
        # through 2 slots (one computing, one prefetching): the same bound, fewer bytes read per token.
        self.pinned = self.window - 2 if 3 <= self.window < len(files) else 0
        if self.window >= len(files):
            self._all = [self._load(f) for f in files]
        else:
            self._pinned = [self._load(f) for f in files[: self.pinned]]
            self._slots = threading.Semaphore(self.window - self.pinned)
            self._ready: queue.Queue = queue.Queue()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._prefetch, name="edgefed-prefetch", daemon=True)
            self._thread.start()

    def _load(self, f: ShardFile) -> Any:
        region = None
        if self._all is None and self._thread is not None and threading.current_thread() is self._thread:
            # Streaming: reuse a released block's mapping (no page faults, zeroing or munmap per block).
            with self._lock:
                region = self._pool.pop() if self._pool else mmap.mmap(-1, self._region_bytes)
        block = self.build(f, self.reader.read(f, region))
        with self._lock:
            self.resident += 1
            self.peak_resident = max(self.peak_resident, self.resident)
            if region is not None:
                self._regions[id(block)] = region
        return block

    @property
    def streamed_bytes_per_pass(self) -> int:
        """Bytes read per pass over the files (per token) once the pinned blocks are in."""
        return 0 if self._all is not None else sum(f.bytes for f in self.files[self.pinned:])

    def _prefetch(self) -> None:
        streamed = self.files[self.pinned:]
        i = 0
        while not self._stop.is_set():
            if not self._slots.acquire(timeout=_POLL_S):
                continue
            if self._stop.is_set():
                return
            try:
                item: Any = self._load(streamed[i % len(streamed)])
            except BaseException as e:  # handed to the consumer, raised there
                self._ready.put(e)
                return
            self._ready.put(item)
            i += 1

    def _take(self) -> Any:
        if self._all is not None:
            return self._all[self._next]
        if self._next < self.pinned:
            return self._pinned[self._next]
        t0 = time.perf_counter()
        item = self._ready.get()
        self.io_wait_s += time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise item
        return item

    def _release(self, item: Any, index: int) -> None:
        if self._all is not None or index < self.pinned:
            return
        self.drop(item)  # the consumer may still hold the object: empty it so no view outlives the reuse
        with self._lock:
            self.resident -= 1
            self._pool.append(self._regions.pop(id(item)))
        self._slots.release()

    def stream(self, count: int) -> Iterator[Any]:
        """The next `count` blocks in order; each is released when the consumer asks for the one after."""
        for _ in range(count):
            index = self._next
            item = self._take()
            self._next = (self._next + 1) % len(self.files)
            yield item
            self._release(item, index)
            del item

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
