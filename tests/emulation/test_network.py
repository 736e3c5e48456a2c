"""Namespaces + veth + bridge + tbf: nodes reach each other, a tbf cap holds a socket transfer to its rate,
a cut link stops traffic and comes back, and deleting the run removes everything it made."""

from __future__ import annotations

import subprocess
import sys

import pytest

from emulation.cleanup import Cleanup, leftovers, run_prefix
from emulation.network import Network, link_env, netem_available, plan_network, tbf_args
from emulation.scenario import Node
from tests.emulation.netutil import mine, snapshot, why_no_netns

CAP_MBIT = 16.0
SEND_BYTES = 2_000_000  # ~1 s at the cap

# receiver: accept one connection, count bytes from the first to the last, print bytes and seconds
RECV = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1); s.settimeout(30); print('ready', flush=True)
c, _ = s.accept(); c.settimeout(30); n = 0; t0 = None
while True:
    b = c.recv(1 << 16)
    if not b: break
    t0 = t0 or time.perf_counter(); n += len(b)
print(n, time.perf_counter() - t0, flush=True)
"""
SEND = """
import socket, sys
s = socket.create_connection((sys.argv[1], 5001), timeout=float(sys.argv[3]))
s.sendall(b'x' * int(sys.argv[2])); s.close()
"""


def test_plan_is_pure_and_names_fit_interfaces():
    nodes = (Node(name="a"), Node(name="b", latency_ms=5, jitter_ms=1))
    plan = plan_network("ef123abc", nodes, netem=False, subnet="10.9.8")
    assert [n.ip for n in plan.nodes] == ["10.9.8.10", "10.9.8.11"] and plan.coordinator.ip == "10.9.8.1"
    assert all(len(n.hub_if) <= 15 and n.ns.startswith("ef123abc") for n in plan.nodes)
    assert plan.latency_mode == "injected"
    assert link_env(plan, "b") == {"EDGEFED_LINK_DELAY_MS": "5", "EDGEFED_LINK_JITTER_MS": "1",
                                   "EDGEFED_LINK_LOSS_PCT": "0"}
    assert link_env(plan_network("ef123abc", nodes, netem=True), "b") == {}
    assert tbf_args(100)[:3] == ["tbf", "rate", "100mbit"]


@pytest.fixture
def net():
    why = why_no_netns()
    if why:
        pytest.skip(why)
    prefix = run_prefix()
    nodes = (Node(name="a", bandwidth_mbit=CAP_MBIT), Node(name="b", bandwidth_mbit=1000))
    with Cleanup(prefix) as cleanup:
        yield Network(plan_network(prefix, nodes, netem=netem_available()), cleanup).build()
    assert leftovers(prefix) == {"netns": [], "links": [], "cgroups": []}


def _transfer(net: Network, nbytes: int, timeout: float = 30) -> tuple[int, float]:
    b = net.plan.of("b")
    recv = subprocess.Popen([*net.exec_argv("b"), sys.executable, "-c", RECV, b.ip], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert recv.stdout.readline().strip() == "ready"
        subprocess.run([*net.exec_argv("a"), sys.executable, "-c", SEND, b.ip, str(nbytes), str(timeout)],
                       check=True, timeout=timeout + 10, capture_output=True)
        n, secs = recv.communicate(timeout=timeout)[0].split()
        return int(n), float(secs)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()


def test_nodes_on_the_bridge_reach_each_other_under_the_tbf_cap(net):
    assert netem_available() is False or net.plan.latency_mode == "netem"
    n, secs = _transfer(net, SEND_BYTES)
    assert n == SEND_BYTES
    mbit = n * 8 / secs / 1e6
    # tbf counts frames (headers too): the payload rate sits a few percent under the cap, never over it
    assert 0.8 * CAP_MBIT <= mbit <= 1.05 * CAP_MBIT, f"{mbit:.2f} Mbit/s through a {CAP_MBIT} Mbit/s cap"
    sent = net.counters("a")
    assert sent["tx_bytes"] >= SEND_BYTES  # the kernel's counters saw the transfer


def test_cut_link_stops_traffic_until_restored(net):
    net.cut("a")
    r = subprocess.run([*net.exec_argv("a"), sys.executable, "-c", SEND, net.plan.of("b").ip, "10", "1"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and ("timed out" in r.stderr or "unreachable" in r.stderr.lower()), r.stderr
    net.restore("a")
    assert _transfer(net, 10_000)[0] == 10_000


def test_a_run_leaves_nothing_behind():
    why = why_no_netns()
    if why:
        pytest.skip(why)
    prefix = run_prefix()
    before = snapshot()
    with Cleanup(prefix) as cleanup:
        Network(plan_network(prefix, (Node(name="a"), Node(name="b")), netem=False), cleanup).build()
        during = mine(snapshot(), prefix)
        assert len(during["netns"]) == 4  # hub, coordinator, a, b
    after = snapshot()
    assert mine(after, prefix) == {"netns": [], "links": [], "cgroups": []}
    assert set(after["netns"]) <= set(before["netns"]) | {n for n in after["netns"] if not n.startswith("ef")}
    assert not (set(after["links"]) - set(before["links"]))  # no link was ever made in the host's namespace


def test_a_node_process_is_in_its_namespace_and_sees_the_cgroup_mounts(net):
    """In the node's network namespace (its veth, not the host's links), yet with the host's mounts, so an agent
    can read its own cgroup's memory cap (edge_node.probe)."""
    code = "print(open('/proc/net/dev').read()); print(open('/proc/self/mountinfo').read())"
    out = subprocess.run([*net.exec_argv("a"), sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    links = {ln.split(":")[0].strip() for ln in out.splitlines() if ":" in ln and "|" not in ln}
    assert "eth0" in links and net.plan.of("a").hub_if not in links
    host_cgroups = [ln for ln in open("/proc/self/mountinfo") if " - cgroup" in ln]
    assert host_cgroups and all(ln.split()[4] in out for ln in host_cgroups)
