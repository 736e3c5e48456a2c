"""What a device has: cores, memory, disk, ONNX Runtime providers, and a measured matmul speed.

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


def device_facts(data_dir: str | Path) -> DeviceFacts:
    mem = psutil.virtual_memory()
    return DeviceFacts(cores=os.cpu_count() or 1, memory_total=mem.total, memory_available=mem.available,
                       disk_free=_disk_free(data_dir), providers=ort_providers(), speed_gflops=speed_gflops(data_dir))


def _disk_free(data_dir: str | Path) -> int:
    return shutil.disk_usage(Path(data_dir)).free


def heartbeat_figures(data_dir: str | Path) -> HeartbeatFigures:
    """psutil figures for one heartbeat: CPU load since the last call, free memory and disk, the agent's RSS
    with its children's."""
    me = psutil.Process()
    rss = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            rss += child.memory_info().rss
        except psutil.Error:
            pass
    return HeartbeatFigures(cpu_percent=psutil.cpu_percent(interval=None), memory_available=psutil.virtual_memory()
                            .available, disk_free=_disk_free(data_dir), agent_rss=rss)
