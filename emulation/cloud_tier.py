"""The testbed's cloud tier: `edgefed cloud-serve` (layers [k, L) of the model, k the exit heads' last layer) as
a real process on its own host (a namespace with a shaped link and caps, like a node) or in the coordinator's
namespace, behind an emulated link: a TCP relay (emulation.link_relay) that adds the [cloud] link's latency
where the kernel has no netem (reported as "injected"), and its bandwidth where no tbf caps a veth. The edge
(rank 0 of the deployment) is given the relay's address. Both processes are removed with the run.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from edge_node.model.errors import EdgefedError
from emulation.fleet import CLOUD, Fleet, NodeProc
from emulation.scenario import Scenario, exit_heads_path

SERVE_PORT, RELAY_PORT, METRICS_PORT = 7071, 7072, 9101  # fixed inside a fresh namespace (coordinator: 7070, 8080)
START_TIMEOUT_S = 120.0


class CloudTierError(EdgefedError):
    """The cloud tier could not be started (a bad exit-head file, a process that died at start)."""


def exit_split(sc: Scenario) -> int:
    """k: the last exit layer of the deployment's heads (the edge runs [0, k), the cloud [k, L))."""
    path = exit_heads_path(sc)
    where = f"{sc.source}: [deployment] exit_heads"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise CloudTierError(f"{where}: no such file {path} (train heads with `edgefed train-exits`)") from None
    except (OSError, ValueError) as e:
        raise CloudTierError(f"{where}: cannot read {path}: {e}") from None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if doc.get("kind") != "edgefed-exit-heads" or not layers or not all(isinstance(i, int) for i in layers):
        raise CloudTierError(f"{where}: {path} is not an edgefed exit-head file (field 'layers')")
    return max(layers)


@dataclass(frozen=True)
class LinkPlan:
    """What the relay adds (pure): latency where netem does not, bandwidth where no tbf does."""

    delay_ms: float
    jitter_ms: float
    mbit: float
    latency_mode: str  # "netem" | "injected"
    label: str


def link_plan(sc: Scenario, fleet_mode: str, latency_mode: str) -> LinkPlan:
    c = sc.cloud
    own = fleet_mode == "isolated" and c.host == "cloud"  # a veth of its own: tbf (and netem, if any) on it
    netem = own and latency_mode == "netem"
    delay, jitter = (0.0, 0.0) if netem else (c.latency_ms, c.jitter_ms)
    mbit = 0.0 if own else c.bandwidth_mbit
    where = "its own host" if c.host == "cloud" else "the coordinator's namespace"
    label = (f"cloud tier on {where}, link {c.bandwidth_mbit:g} Mbit/s ({'tbf' if own else 'injected'}), "
             f"{c.latency_ms:g} ms one-way +-{c.jitter_ms:g} ms ({'netem' if netem else 'injected by a TCP relay'})")
    return LinkPlan(delay, jitter, mbit, "netem" if netem else "injected", label)


class CloudTier:
    """The running tier: `address` is what the edge dials (the relay); `stats()` reads its /metrics."""

    def __init__(self, sc: Scenario, fleet: Fleet, split: int, free_port: Callable[[], int]):
        self.sc, self.fleet, self.split = sc, fleet, split
        loop = fleet.mode == "loopback"
        self.ip = fleet.ip(CLOUD)
        self.serve_port = free_port() if loop else SERVE_PORT
        self.relay_port = free_port() if loop else RELAY_PORT
        self.metrics_port = free_port() if loop else METRICS_PORT
        self.address = f"{self.ip}:{self.relay_port}"
        self.link = link_plan(sc, fleet.mode, fleet.latency_mode)
        self.procs: list[NodeProc] = []

    def start(self, model: str) -> CloudTier:
        c = self.sc.cloud
        serve = [sys.executable, "-m", "edgefed", "cloud-serve", "--model", model, "--split", str(self.split),
                 "--host", "127.0.0.1", "--port", str(self.serve_port), "--max-mb", f"{c.max_mb:g}",
                 "--session-ttl", f"{c.session_ttl_s:g}", "--threads", "1", "--metrics",
                 f"{self.ip}:{self.metrics_port}"]
        proc = self.fleet.start(CLOUD, "cloud-serve", serve)
        self.procs.append(proc)
        self._wait(proc, "cloud tier listening on")
        lk = self.link
        relay = [sys.executable, "-m", "emulation.link_relay", f"{self.ip}:{self.relay_port}",
                 f"127.0.0.1:{self.serve_port}", f"delay_ms={lk.delay_ms:g}", f"jitter_ms={lk.jitter_ms:g}",
                 f"mbit={lk.mbit:g}"]
        proc = self.fleet.start(CLOUD, "link-relay", relay)
        self.procs.append(proc)
        self._wait(proc, "link relay on")
        return self

    def _wait(self, p: NodeProc, line: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if line in p.log.read_text(errors="replace"):
                return
            how = self.fleet.ended(p)
            if how is not None:
                tail = " | ".join(p.log.read_text(errors="replace").strip().splitlines()[-3:])
                raise CloudTierError(f"{p.role} ({CLOUD}) ended ({how}) at start: {tail}")
            time.sleep(0.2)
        raise CloudTierError(f"{p.role} ({CLOUD}) not up after {START_TIMEOUT_S:g} s")

    def stats(self) -> dict:
        """The tier's /metrics figures (sessions, memory used against its bound, counters) and how it ended."""
        out: dict = {"address": self.address, "split": self.split, "link": self.link.label,
                     "latency_mode": self.link.latency_mode, "host": self.sc.cloud.host,
                     "ended": next((e for e in (self.fleet.ended(p) for p in self.procs) if e), None)}
        try:
            r = httpx.get(f"http://{self.ip}:{self.metrics_port}/metrics", timeout=5.0)
            r.raise_for_status()
            out["metrics"] = parse_metrics(r.text)
        except (httpx.HTTPError, OSError) as e:
            out["metrics_error"] = f"{type(e).__name__}: {e}"
        return out


_SAMPLE = re.compile(r"^edgefed_cloud_([a-z_]+?)(?:_total)? ([-+0-9.eE]+|NaN)$")


def parse_metrics(text: str) -> dict[str, float]:
    """edgefed_cloud_* samples of a Prometheus text page, by name without the prefix (pure)."""
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if m and not m.group(1).endswith("_created"):
            out[m.group(1)] = float(m.group(2))
    return out


def model_dir(sc: Scenario) -> str:
    return str(Path(sc.model.path).resolve())
