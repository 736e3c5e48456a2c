"""The testbed's network: one namespace per node, each joined by a veth pair to a bridge in a hub namespace.

The bridge and every node's veth live in the run's namespaces, which `ip netns del` removes together with
their qdiscs. Only `Network.open_host_access()` adds to the host's namespace: one prefixed veth end on the
run's own /24, so the testbed process itself can call the coordinator's API (removed with the run).
Bandwidth is capped with tbf on both ends of each node's veth (both directions). Latency, jitter and loss use
netem when the kernel has it (probed once, in a scratch namespace); otherwise they are injected in the node's
transport (edge_node.collectives reads EDGEFED_LINK_* from the environment `link_env()` returns) and reported
as "injected".
"""

from __future__ import annotations

import functools
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from edge_node.model.errors import EdgefedError
from emulation.cleanup import Cleanup, run_prefix, sh
from emulation.scenario import Node

NETNS_DIR = "/run/netns"  # where `ip netns add` pins a namespace
NODE_IF = "eth0"  # the node's end of its veth, inside its namespace


@dataclass(frozen=True)
class NodeNet:
    name: str  # the scenario's node name
    ns: str  # its network namespace
    ip: str
    hub_if: str  # the veth end on the bridge, in the hub namespace
    node: Node


@dataclass(frozen=True)
class NetPlan:
    prefix: str
    hub_ns: str
    bridge: str
    subnet: str  # "10.a.b": hosts are .1 (coordinator), .2 (the cloud tier's own host), .10 + i (nodes)
    coordinator: NodeNet
    nodes: tuple[NodeNet, ...]
    latency_mode: str  # "netem" or "injected"
    cloud: NodeNet | None = None  # the cloud tier's host, when it has one (named "cloud")

    def of(self, name: str) -> NodeNet:
        for n in (*self.nodes, *([self.cloud] if self.cloud else [])):
            if n.name == name:
                return n
        raise KeyError(name)


def plan_network(prefix: str, nodes: tuple[Node, ...], netem: bool, subnet: str | None = None,
                 cloud: Node | None = None) -> NetPlan:
    """Pure: names and addresses for a run (the coordinator gets an uncapped link of its own; `cloud`, a Node
    named "cloud", a shaped link like a node's)."""
    subnet = subnet or f"10.{random.randrange(0, 255)}.{random.randrange(0, 256)}"  # 10.255.*.* left alone
    coord = NodeNet("coordinator", f"{prefix}-coord", f"{subnet}.1", f"{prefix}c",
                    Node(name="coordinator", memory_mb=1 << 20, cpu_quota=1.0, bandwidth_mbit=10_000))
    nets = tuple(NodeNet(n.name, f"{prefix}-n{i}", f"{subnet}.{10 + i}", f"{prefix}v{i}", n)
                 for i, n in enumerate(nodes))
    cloud_net = None if cloud is None else NodeNet("cloud", f"{prefix}-cloud", f"{subnet}.2", f"{prefix}k", cloud)
    return NetPlan(prefix, f"{prefix}-hub", "br0", subnet, coord, nets, "netem" if netem else "injected", cloud_net)


@functools.cache
def netem_available() -> bool:
    """Whether the kernel has sch_netem: tried in a scratch namespace, removed again."""
    ns = f"{run_prefix()}-probe"
    if sh("ip", "netns", "add", ns, check=False).returncode != 0:
        return False
    try:
        return sh("tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                  check=False).returncode == 0
    finally:
        sh("ip", "netns", "del", ns, check=False)


def tbf_args(mbit: float) -> list[str]:
    """tbf for `mbit` with a burst of ~10 ms of traffic (at least 4 full frames) and 50 ms of queue."""
    burst = max(4 * 1514, int(mbit * 1e6 / 8 / 100))
    return ["tbf", "rate", f"{mbit:g}mbit", "burst", str(burst), "latency", "50ms"]


def netem_args(n: Node) -> list[str]:
    args = ["netem", "delay", f"{n.latency_ms:g}ms"]
    if n.jitter_ms:
        args += [f"{n.jitter_ms:g}ms"]
    if n.loss_pct:
        args += ["loss", f"{n.loss_pct:g}%"]
    return args


def link_env(plan: NetPlan, name: str) -> dict[str, str]:
    """Environment for a node's processes: the injected link (when netem is not in use)."""
    n = plan.of(name).node
    if plan.latency_mode == "netem":
        return {}
    return {"EDGEFED_LINK_DELAY_MS": f"{n.latency_ms:g}", "EDGEFED_LINK_JITTER_MS": f"{n.jitter_ms:g}",
            "EDGEFED_LINK_LOSS_PCT": f"{n.loss_pct:g}"}


class Network:
    """Builds a NetPlan; every step is registered with the cleanup before the next is taken."""

    def __init__(self, plan: NetPlan, cleanup: Cleanup):
        self.plan, self.cleanup = plan, cleanup

    def build(self) -> Network:
        p = self.plan
        self._netns(p.hub_ns)
        sh("ip", "-n", p.hub_ns, "link", "add", p.bridge, "type", "bridge")
        sh("ip", "-n", p.hub_ns, "link", "set", "lo", "up")
        sh("ip", "-n", p.hub_ns, "link", "set", p.bridge, "up")
        for n in (p.coordinator, *p.nodes, *([p.cloud] if p.cloud else [])):
            self._attach(n)
        return self

    def _netns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.cleanup.add(f"network namespace {ns}", lambda: _del_netns(ns))

    def _attach(self, n: NodeNet) -> None:
        p = self.plan
        self._netns(n.ns)
        # both ends are born in their namespaces: nothing ever appears in the host's
        sh("ip", "link", "add", NODE_IF, "netns", n.ns, "type", "veth", "peer", "name", n.hub_if, "netns", p.hub_ns)
        sh("ip", "-n", p.hub_ns, "link", "set", n.hub_if, "master", p.bridge)
        sh("ip", "-n", n.ns, "addr", "add", f"{n.ip}/24", "dev", NODE_IF)
        for ns, dev in ((n.ns, "lo"), (n.ns, NODE_IF), (p.hub_ns, n.hub_if)):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        if n is not p.coordinator:
            self.shape(n)

    def shape(self, n: NodeNet) -> None:
        """tbf (and netem, where the kernel has it) on the node's egress and on its ingress (the hub end)."""
        for ns, dev in ((n.ns, NODE_IF), (self.plan.hub_ns, n.hub_if)):
            if self.plan.latency_mode == "netem" and (n.node.latency_ms or n.node.jitter_ms or n.node.loss_pct):
                sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "handle", "1:", *netem_args(n.node))
                sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "parent", "1:1", "handle", "10:",
                   *tbf_args(n.node.bandwidth_mbit))
            else:
                sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *tbf_args(n.node.bandwidth_mbit))

    def cut(self, name: str) -> None:
        """The node's link goes down (its hub end: the node itself sees a carrier loss)."""
        sh("ip", "-n", self.plan.hub_ns, "link", "set", self.plan.of(name).hub_if, "down")

    def restore(self, name: str) -> None:
        sh("ip", "-n", self.plan.hub_ns, "link", "set", self.plan.of(name).hub_if, "up")

    def open_host_access(self) -> str:
        """A veth from the host's namespace to the bridge (address .254 on the run's subnet); returns it.
        Refused when the host already routes that subnet, so nothing of the host's is shadowed."""
        p = self.plan
        routes = sh("ip", "route", "show", "match", f"{p.subnet}.0/24").stdout
        if any(not line.startswith("default") for line in routes.splitlines() if line.strip()):
            raise EdgefedError(f"the host already routes {p.subnet}.0/24; run again (the subnet is random)")
        host_if, peer = f"{p.prefix}h", f"{p.prefix}hp"
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer, "netns", p.hub_ns)
        self.cleanup.add(f"host link {host_if}", lambda: sh("ip", "link", "del", host_if, check=False))
        sh("ip", "-n", p.hub_ns, "link", "set", peer, "master", p.bridge)
        sh("ip", "-n", p.hub_ns, "link", "set", peer, "up")
        sh("ip", "addr", "add", f"{p.subnet}.254/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        return f"{p.subnet}.254"

    def exec_argv(self, name: str) -> list[str]:
        """Prefix for a command run inside the node's namespace ("coordinator" for the coordinator's)."""
        ns = self.plan.coordinator.ns if name == "coordinator" else self.plan.of(name).ns
        if shutil.which("nsenter") and Path(NETNS_DIR, ns).exists():
            # the network namespace only: `ip netns exec` also gives the process a fresh /sys without the cgroup
            # mounts, so an agent could not read its own memory cap (edge_node.probe)
            return ["nsenter", f"--net={NETNS_DIR}/{ns}", "--"]
        return ["ip", "netns", "exec", ns]

    def counters(self, name: str) -> dict[str, int]:
        """Bytes the node sent and received on its link, from the kernel's interface counters."""
        ns = self.plan.coordinator.ns if name == "coordinator" else self.plan.of(name).ns
        r = sh("ip", "-n", ns, "-s", "-j", "link", "show", NODE_IF, check=False)
        try:
            stats = json.loads(r.stdout)[0]["stats64"]
            return {"tx_bytes": int(stats["tx"]["bytes"]), "rx_bytes": int(stats["rx"]["bytes"])}
        except (json.JSONDecodeError, IndexError, KeyError):
            return {"tx_bytes": 0, "rx_bytes": 0}


def _del_netns(ns: str) -> None:
    from emulation.cleanup import kill_netns_processes

    kill_netns_processes(ns)
    sh("ip", "netns", "del", ns, check=False)
