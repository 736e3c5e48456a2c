"""What a device has: cores, memory (a cgroup's cap where one limits the process), disk, ONNX Runtime
providers, and a measured matmul speed.

The speed probe (a few float32 matmuls, ~0.1-0.3 s) runs once per device and is cached in the agent's data
directory, keyed by what would change it (CPU model, core count, torch version); placement compares
nodes by it. torch is imported only when the probe actually runs, so a cached agent stays light.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

import psutil

from edge_node.control import DeviceFacts, HeartbeatFigures

SPEED_CACHE = "speed_probe.json"
_N = 256  # matmul size: big enough to reach the BLAS kernel, small enough to finish fast on a weak core


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_key() -> str:
    import importlib.metadata as md

    try:
        torch_version = md.version("torch")
    except md.PackageNotFoundError:
        torch_version = "?"
    return f"{_cpu_model()}|{os.cpu_count()}|torch {torch_version}"


def measure_gflops(repeats: int = 8) -> float:
    """Best-of float32 GFLOP/s of an (N, N) @ (N, N) matmul on torch's threads."""
    import torch

    a, b = torch.randn(_N, _N), torch.randn(_N, _N)
    a @ b  # warm-up: thread pool, kernel choice
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * _N**3 / min(times) / 1e9  # the best run: on a shared machine the others measure the neighbours


def speed_gflops(data_dir: str | Path) -> float:
    """The cached probe result for this device, measuring (and caching) it when absent or stale."""
    path = Path(data_dir) / SPEED_CACHE
    key = _device_key()
    try:
        cached = json.loads(path.read_text())
        if cached.get("device") == key and float(cached["gflops"]) > 0:
            return float(cached["gflops"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    gflops = round(measure_gflops(), 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"device": key, "gflops": gflops, "measured": time.time()}))
    tmp.replace(path)
    return gflops


def ort_providers() -> tuple[str, ...]:
    try:
        import onnxruntime
    except ImportError:
        return ()
    return tuple(onnxruntime.get_available_providers())


def _mounts(mountinfo: Path) -> list[tuple[str, Path, str, set[str]]]:
    """(root, mount point, fstype, super options) of every mount, from /proc/self/mountinfo."""
    found = []
    for line in mountinfo.read_text().splitlines():
        head, sep, tail = line.partition(" - ")
        f, t = head.split(), tail.split()
        if sep and len(f) >= 5 and len(t) >= 3:
            found.append((f[3], Path(f[4]), t[0], set(t[2].split(","))))
    return found


def _int(path: Path) -> int | None:
    """An integer cgroup file; None when absent, unreadable or "max"."""
    try:
        raw = path.read_text().strip()
    except OSError:
        return None
    return int(raw) if raw.isdigit() else None


def _inactive_file(d: Path, key: str) -> int:
    """Page cache the kernel reclaims before it hits the cap (counted in usage, yet available)."""
    try:
        for line in (d / "memory.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key and v.strip().isdigit():
                return int(v)
    except OSError:
        pass
    return 0


def cgroup_memory(proc_cgroup: str | Path = "/proc/self/cgroup", mountinfo: str | Path = "/proc/self/mountinfo",
                  ) -> tuple[int, int] | None:
    """(limit, available) bytes of this process's memory cgroup, the tightest over it and its ancestors (a parent's
    cap binds its children too); None when no cgroup limits the process. cgroup v2: memory.max / memory.current;
    v1: memory.limit_in_bytes / memory.usage_in_bytes; reclaimable page cache counts as available."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
        mounts = _mounts(Path(mountinfo))
    except OSError:
        return None
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if ctrls == "":  # v2 (unified): used only when it has the memory controller
            v2 = [m for m in mounts if m[2] == "cgroup2"]
            names, stat_key = ("memory.max", "memory.current"), "inactive_file"
        elif "memory" in ctrls.split(","):
            v2 = [m for m in mounts if m[2] == "cgroup" and "memory" in m[3]]
            names, stat_key = ("memory.limit_in_bytes", "memory.usage_in_bytes"), "total_inactive_file"
        else:
            continue
        for root, point, _, _ in v2:
            rel = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
            if rel.startswith(".."):
                continue  # this mount shows another part of the hierarchy
            best = None
            d = point / rel
            while True:
                limit, usage = _int(d / names[0]), _int(d / names[1])
                if limit is not None and usage is not None:
                    avail = max(0, limit - usage + _inactive_file(d, stat_key))
                    best = (limit, avail) if best is None else (min(best[0], limit), min(best[1], avail))
                if d == point or point not in d.parents:
                    break
                d = d.parent
            if best is not None and best[0] < psutil.virtual_memory().total:  # v1 "unlimited" is a huge number
                return best
    return None


def _memory() -> tuple[int, int]:
    """(total, available) bytes: the host's, or the process's cgroup cap where that is tighter."""
    mem = psutil.virtual_memory()
    cg = cgroup_memory()
    if cg is None:
        return mem.total, mem.available
    return min(mem.total, cg[0]), min(mem.available, cg[1])


def device_facts(data_dir: str | Path) -> DeviceFacts:
    """Cores, memory, disk, providers and speed; memory is the cgroup's cap and headroom when one limits the
    process (a container, a testbed node), so placement plans against what the node may really use."""
    total, available = _memory()
    return DeviceFacts(cores=os.cpu_count() or 1, memory_total=total, memory_available=available,
                       disk_free=_disk_free(data_dir), providers=ort_providers(), speed_gflops=speed_gflops(data_dir))


def _disk_free(data_dir: str | Path) -> int:
    return shutil.disk_usage(Path(data_dir)).free


def heartbeat_figures(data_dir: str | Path) -> HeartbeatFigures:
    """psutil figures for one heartbeat: CPU load since the last call, free memory (the cgroup's headroom where
    one caps the process) and disk, the agent's RSS with its children's."""
    me = psutil.Process()
    rss = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            rss += child.memory_info().rss
        except psutil.Error:
            pass
    return HeartbeatFigures(cpu_percent=psutil.cpu_percent(interval=None), memory_available=_memory()[1],
                            disk_free=_disk_free(data_dir), agent_rss=rss)
