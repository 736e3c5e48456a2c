"""The testbed's machines: each node a namespace (its link shaped) and a cgroup (its caps), and the processes
started in them, sampled for memory and link bytes while they run. Without root (or without iproute2 or a
cgroup memory controller) the nodes are plain loopback processes with injected links and RSS monitoring;
`Fleet.mode` says which.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from emulation.cgroups import Cgroup, cgroup_version, create_cgroup
from emulation.cleanup import Cleanup
from emulation.network import NetPlan, Network, link_env, netem_available, plan_network
from emulation.scenario import Node, Scenario

CLOUD = "cloud"  # the cloud tier's processes run under this name (on its own host, or in the coordinator's)


def isolation_unavailable() -> str | None:
    """Why nodes cannot get namespaces and cgroups here (None: they can)."""
    import shutil

    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is missing"
    if cgroup_version() is None:
        return "no cgroup memory controller"
    return None


@dataclass
class NodeProc:
    name: str
    role: str  # "agent", "coordinator", ...
    proc: subprocess.Popen
    log: Path
    oom_before: int = 0
    ended: str | None = None  # how it ended, once it has


@dataclass
class Samples:
    """Memory over time per node (MB), and link bytes at the end."""

    t0: float = field(default_factory=time.monotonic)
    memory: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def add(self, name: str, mb: float) -> None:
        self.memory.setdefault(name, []).append((round(time.monotonic() - self.t0, 3), round(mb, 2)))


class Fleet:
    """Namespaces + cgroups for a scenario's nodes (mode "isolated"), or loopback processes ("loopback")."""

    def __init__(self, sc: Scenario, prefix: str, cleanup: Cleanup, logs: Path, isolate: bool | None = None):
        self.sc, self.prefix, self.cleanup, self.logs = sc, prefix, cleanup, logs
        why = isolation_unavailable()
        self.mode = "isolated" if (isolate if isolate is not None else why is None) and why is None else "loopback"
        self.why_loopback = None if self.mode == "isolated" else (why or "loopback asked for")
        self.net: Network | None = None
        self.plan: NetPlan | None = None
        self.cgroups: dict[str, Cgroup] = {}
        self.procs: list[NodeProc] = []
        self.samples = Samples()
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    @property
    def latency_mode(self) -> str:
        return self.plan.latency_mode if self.plan else "injected"

    def build(self) -> Fleet:
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.mode == "isolated":
            cloud = cloud_host(self.sc)
            self.plan = plan_network(self.prefix, self.sc.nodes, netem=netem_available(), cloud=cloud)
            self.net = Network(self.plan, self.cleanup).build()
            for n in (*self.sc.nodes, *([cloud] if cloud else [])):
                cg = create_cgroup(f"{self.prefix}-{n.name}", n.memory_mb, n.cpu_quota)
                self.cleanup.add(f"cgroup {cg.name}", cg.remove)
                self.cgroups[n.name] = cg
        self._sampler = threading.Thread(target=self._sample, name="testbed-sampler", daemon=True)
        self._sampler.start()
        self.cleanup.add("sampler", self._stop.set)
        return self

    def host_of(self, name: str) -> str:
        """Whose namespace `name` runs in: the cloud tier's may be the coordinator's."""
        if name == CLOUD and self.sc.cloud is not None and self.sc.cloud.host == "coordinator":
            return "coordinator"
        return name

    def ip(self, name: str) -> str:
        """The address other processes reach `name` ("coordinator", "cloud" or a node) at."""
        if self.plan is None:
            return "127.0.0.1"
        host = self.host_of(name)
        return self.plan.coordinator.ip if host == "coordinator" else self.plan.of(host).ip

    def start(self, name: str, role: str, argv: list[str], env: dict[str, str] | None = None) -> NodeProc:
        """Start a process as `name` (a node or "coordinator"): in its namespace and cgroup when isolated,
        with its link injected when netem is absent. Registered for cleanup before it can outlive us."""
        penv = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        cg = self.cgroups.get(name)
        if name not in ("coordinator", CLOUD):
            penv.update(link_env(self.plan, name) if self.plan else _loopback_link_env(self.sc, name))
        if self.net is not None:
            argv = [*self.net.exec_argv(self.host_of(name)), *argv]
        log = self.logs / f"{name}.{role}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=penv,
                                    preexec_fn=cg.preexec() if cg else None, start_new_session=True)
        self.cleanup.process(proc, f"{role} {name}")
        np_ = NodeProc(name, role, proc, log, cg.oom_kills() if cg else 0)
        self.procs.append(np_)
        return np_

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def ended(self, p: NodeProc) -> str | None:
        """How a process ended (an OOM kill named as such), None while it runs."""
        rc = p.proc.poll()
        if rc is None:
            return None
        cg = self.cgroups.get(p.name)
        if cg is not None:
            p.ended = cg.explain_exit(rc, p.oom_before)
        else:
            p.ended = f"exit status {rc}" if rc >= 0 else f"killed by {signal.Signals(-rc).name}"
        return p.ended

    def kill(self, name: str) -> list[int]:
        """SIGKILL every process of the node and what they started (a node failure); their pids."""
        procs = []
        for p in self.procs:
            if p.name == name and p.proc.poll() is None:
                try:
                    root = psutil.Process(p.proc.pid)
                    procs += [root, *root.children(recursive=True)]
                except psutil.Error:
                    pass
        for q in procs:
            with contextlib.suppress(psutil.Error):
                q.kill()
        return [q.pid for q in procs]

    def memory_mb(self, name: str) -> float:
        cg = self.cgroups.get(name)
        if cg is not None:
            return cg.memory_bytes() / 2**20
        total = 0
        for p in self.procs:
            if p.name == name and p.proc.poll() is None:
                total += _tree_rss(p.proc.pid)
        return total / 2**20

    def peak_mb(self, name: str) -> float:
        cg = self.cgroups.get(name)
        seen = max((mb for _, mb in self.samples.memory.get(name, [])), default=0.0)
        return max(seen, cg.peak_bytes() / 2**20) if cg is not None else seen

    def link_bytes(self, name: str) -> dict[str, int] | None:
        """Bytes the node's link carried (kernel counters; None in loopback mode, where there is no link)."""
        return self.net.counters(name) if self.net is not None else None

    def _sample(self, every_s: float = 0.5) -> None:
        names = [n.name for n in self.sc.nodes] + ([CLOUD] if self.sc.cloud is not None else [])
        while not self._stop.wait(every_s):
            for name in names:
                self.samples.add(name, self.memory_mb(name))


def cloud_host(sc: Scenario) -> Node | None:
    """The cloud tier's own host as a node (its caps and link), or None (no tier, or in the coordinator's)."""
    c = sc.cloud
    if c is None or c.host != "cloud":
        return None
    return Node(CLOUD, c.memory_mb, c.cpu_quota, c.bandwidth_mbit, c.latency_ms, c.jitter_ms)


def _tree_rss(pid: int) -> int:
    try:
        p = psutil.Process(pid)
        return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
    except psutil.Error:
        return 0


def _loopback_link_env(sc: Scenario, name: str) -> dict[str, str]:
    n = sc.node(name)
    return {"EDGEFED_LINK_DELAY_MS": f"{n.latency_ms:g}", "EDGEFED_LINK_JITTER_MS": f"{n.jitter_ms:g}",
            "EDGEFED_LINK_MBIT": f"{n.bandwidth_mbit:g}", "EDGEFED_LINK_LOSS_PCT": f"{n.loss_pct:g}"}
