"""Prometheus metrics of the coordinator's user API, in one registry per app (never the process-global one).

Per deployment: requests by HTTP status, prompt and generated tokens, queue depth and running requests,
time to first token and per-token latency histograms. Per node: memory, CPU, heartbeat age and state, read at
scrape time from a callable the coordinator gives (its node registry), so they are never stale.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class NodeSample:
    """One node as the coordinator's registry last saw it."""

    node_id: str
    state: str  # the registry's word for it: "ready", "lost", ...
    memory_total_bytes: int
    memory_available_bytes: int
    cpu_percent: float
    heartbeat_age_s: float  # seconds since its last heartbeat


@dataclass(frozen=True)
class QueueSample:
    waiting: int
    running: int


class _NodeCollector(Collector):
    def __init__(self, read: Callable[[], Iterable[NodeSample]]):
        self.read = read

    def collect(self):
        try:
            samples = list(self.read())
        except Exception:  # a scrape reports what it can; the node registry's failure is logged, not a 500
            log.exception("reading node samples for /metrics failed")
            samples = []
        fams = {
            "memory_total_bytes": GaugeMetricFamily("edgefed_node_memory_total_bytes", "Node memory", labels=["node"]),
            "memory_available_bytes": GaugeMetricFamily("edgefed_node_memory_available_bytes",
                                                        "Node memory available", labels=["node"]),
            "cpu_percent": GaugeMetricFamily("edgefed_node_cpu_percent", "Node CPU use (percent)", labels=["node"]),
            "heartbeat_age_s": GaugeMetricFamily("edgefed_node_heartbeat_age_seconds",
                                                 "Seconds since the node's last heartbeat", labels=["node"]),
        }
        state = GaugeMetricFamily("edgefed_node_state", "1 for the node's current state", labels=["node", "state"])
        for s in samples:
            for key, fam in fams.items():
                fam.add_metric([s.node_id], float(getattr(s, key)))
            state.add_metric([s.node_id, s.state], 1.0)
        yield from fams.values()
        yield state


class _QueueCollector(Collector):
    def __init__(self, read: Callable[[], Mapping[str, QueueSample]]):
        self.read = read

    def collect(self):
        waiting = GaugeMetricFamily("edgefed_queue_depth", "Requests waiting for a deployment", labels=["deployment"])
        running = GaugeMetricFamily("edgefed_running_requests", "Requests generating", labels=["deployment"])
        for name, q in sorted(self.read().items()):
            waiting.add_metric([name], q.waiting)
            running.add_metric([name], q.running)
        yield waiting
        yield running


class ApiMetrics:
    def __init__(self, queues: Callable[[], Mapping[str, QueueSample]],
                 nodes: Callable[[], Iterable[NodeSample]] | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("edgefed_requests", "Generation requests by HTTP status", ["deployment", "status"],
                                registry=r)
        self.prompt_tokens = Counter("edgefed_prompt_tokens", "Prompt tokens received", ["deployment"], registry=r)
        self.tokens = Counter("edgefed_generated_tokens", "Tokens generated", ["deployment"], registry=r)
        self.ttft = Histogram("edgefed_time_to_first_token_seconds", "Request received -> first token (queueing "
                              "included)", ["deployment"], buckets=TTFT_BUCKETS, registry=r)
        self.token_latency = Histogram("edgefed_token_latency_seconds", "Time between successive tokens",
                                       ["deployment"], buckets=TOKEN_BUCKETS, registry=r)
        r.register(_QueueCollector(queues))
        if nodes is not None:
            r.register(_NodeCollector(nodes))

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


CLOUD_GAUGES = {"sessions": "Open cloud sessions", "memory_used_bytes": "KV and queued hidden states held",
                "memory_allocated_bytes": "KV capacity and queued hidden states allocated",
                "memory_bound_bytes": "The bound on KV and queued states, all sessions",
                "queued_tokens": "Hidden states of edge-exited tokens waiting for their deep KV"}


class _CloudCollector(Collector):
    """The cloud tier's figures (coordinator.cloud.CloudContextManager.metrics), read at scrape time."""

    def __init__(self, read: Callable[[], Mapping[str, float]]):
        self.read = read

    def collect(self):
        values = self.read()
        for name, value in sorted(values.items()):
            if name in CLOUD_GAUGES:
                yield GaugeMetricFamily(f"edgefed_cloud_{name}", CLOUD_GAUGES[name], value=float(value))
            else:  # everything else the manager counts only grows
                yield CounterMetricFamily(f"edgefed_cloud_{name}", f"Cloud tier: {name.replace('_', ' ')}",
                                          value=float(value))


def cloud_registry(read: Callable[[], Mapping[str, float]]) -> CollectorRegistry:
    """A registry of its own for `edgefed cloud-serve --metrics` (never the process-global one)."""
    registry = CollectorRegistry()
    registry.register(_CloudCollector(read))
    return registry
