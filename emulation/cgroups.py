"""Per-node memory cap (swap off) and CPU quota in a cgroup: v1 (memory + cpu controllers) or v2.

Each node's cgroup is made under the cgroup this process already runs in, so a testbed never escapes (or
loosens) the limits it was started under. A node process that goes over its cap is killed by the kernel's
OOM killer; `Cgroup.oom_kills()` reads the kernel's own count, so an exit by SIGKILL is reported as an OOM
kill only when the kernel says one happened.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from edge_node.model.errors import EdgefedError

ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000


class CgroupError(EdgefedError):
    """A cgroup could not be made or configured."""


def cgroup_version(root: Path = ROOT) -> str | None:
    """"v2" (unified hierarchy with the memory controller), "v1" (memory and cpu controllers), or None."""
    if (root / "cgroup.controllers").is_file() and "memory" in (root / "cgroup.controllers").read_text().split():
        return "v2"
    if (root / "memory" / "memory.limit_in_bytes").is_file() and (root / "cpu" / "cpu.cfs_quota_us").is_file():
        return "v1"
    return None


def _own(controller: str) -> str:
    """This process's path in a v1 controller's hierarchy ("" for v2's), from /proc/self/cgroup."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(",") or (controller == "" and ctrls == ""):
            return path.lstrip("/")
    return ""


def cgroup_parents(root: Path = ROOT) -> list[Path]:
    """Where node cgroups are made: beside this process, in each hierarchy used."""
    version = cgroup_version(root)
    if version == "v2":
        return [root / _own("")]
    if version == "v1":
        return [root / "memory" / _own("memory"), root / "cpu" / _own("cpu")]
    return []


@dataclass
class Cgroup:
    """One node's cgroup (v1: a directory in the memory and one in the cpu hierarchy; v2: one directory)."""

    name: str
    memory_mb: int
    cpu_quota: float
    version: str
    dirs: tuple[Path, ...]

    @property
    def memory_dir(self) -> Path:
        return self.dirs[0]

    def _read(self, name: str) -> str:
        try:
            return (self.memory_dir / name).read_text()
        except OSError:
            return ""

    def add(self, pid: int) -> None:
        """Move a process (and so its future children) into the cgroup."""
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(pid))

    def preexec(self):
        """For subprocess.Popen(preexec_fn=...): the child joins the cgroup before it execs."""
        def join() -> None:
            self.add(os.getpid())
        return join

    def memory_bytes(self) -> int:
        raw = self._read("memory.current" if self.version == "v2" else "memory.usage_in_bytes").strip()
        return int(raw) if raw.isdigit() else 0

    def peak_bytes(self) -> int:
        raw = self._read("memory.peak" if self.version == "v2" else "memory.max_usage_in_bytes").strip()
        return int(raw) if raw.isdigit() else 0

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer ended in this cgroup."""
        text = self._read("memory.events" if self.version == "v2" else "memory.oom_control")
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def pids(self) -> list[int]:
        return [int(p) for p in self._read("cgroup.procs").split() if p.isdigit()]

    def explain_exit(self, returncode: int | None, oom_before: int = 0) -> str | None:
        """How a node process ended, with an OOM kill named as such (None while it runs)."""
        if returncode is None:
            return None
        if returncode == -signal.SIGKILL and self.oom_kills() > oom_before:
            return f"killed by the kernel OOM killer (memory cap {self.memory_mb} MB, swap off)"
        if returncode < 0:
            return f"killed by {signal.Signals(-returncode).name}"
        return f"exit status {returncode}"

    def remove(self) -> None:
        for d in self.dirs:
            remove_cgroup_dir(d)


def create_cgroup(name: str, memory_mb: int, cpu_quota: float, root: Path = ROOT) -> Cgroup:
    """Make a cgroup capped at `memory_mb` (swap off) and `cpu_quota` CPUs; `name` starts with the run prefix."""
    version = cgroup_version(root)
    if version is None:
        raise CgroupError(f"no usable cgroup memory controller under {root}")
    limit = str(int(memory_mb) * 1024 * 1024)
    quota = str(max(1000, int(cpu_quota * CPU_PERIOD_US)))
    dirs = tuple(parent / name for parent in cgroup_parents(root))
    cg = Cgroup(name, memory_mb, cpu_quota, version, dirs)
    try:
        for d in dirs:
            d.mkdir()
        if version == "v2":
            _write(dirs[0] / "memory.max", limit)
            _write(dirs[0] / "memory.swap.max", "0", optional=True)
            _write(dirs[0] / "cpu.max", f"{quota} {CPU_PERIOD_US}", optional=True)
        else:
            mem, cpu = dirs
            _write(mem / "memory.limit_in_bytes", limit)
            _write(mem / "memory.memsw.limit_in_bytes", limit, optional=True)  # memory + swap = memory: no swap
            _write(mem / "memory.swappiness", "0", optional=True)
            _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", quota)
    except (OSError, CgroupError) as e:
        cg.remove()
        raise CgroupError(f"cgroup {name}: {e}") from None
    return cg


def _write(path: Path, value: str, optional: bool = False) -> None:
    try:
        path.write_text(value)
    except FileNotFoundError:
        if not optional:
            raise CgroupError(f"{path} does not exist (is the controller enabled?)") from None
    except OSError as e:
        raise CgroupError(f"cannot write {value} to {path}: {e.strerror}") from None


def remove_cgroup_dir(d: Path) -> None:
    """SIGKILL what is left in the cgroup (only our node processes are in it), then remove it."""
    if not d.is_dir():
        return
    for _ in range(50):
        try:
            pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
        except OSError:
            pids = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)  # the killed processes are still exiting
    raise CgroupError(f"cannot remove {d}: processes remain in it")
