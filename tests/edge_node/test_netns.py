"""Ranks on separate hosts form a group with no GLOO_SOCKET_IFNAME: two network namespaces joined by a veth pair
stand in for two hosts; each rank finds the interface that routes to --master-addr by itself. Plus fast unit
tests of route_interface and of an unknown --iface."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys

import pytest

from edge_node.collectives import Comm, CommError, route_interface
from edge_node.model import generate, load_model
from edge_node.shard import write_shards
from tests.checkpoints import make_checkpoint

PROMPT = [5, 6, 7, 8]
NEW_TOKENS = 6
RANK_TIMEOUT_S = 180  # each rank process, start-up included; the group itself waits at most --timeout 60


def test_route_interface_of_loopback_is_lo():
    assert route_interface("127.0.0.1") == "lo"
    assert route_interface("localhost") == "lo"


def test_unresolvable_host_is_a_comm_error_naming_it(monkeypatch):
    # A label over 63 characters fails in the encoder, before any resolver is asked: no traffic.
    bad = "x" * 64 + ".invalid"
    with pytest.raises(CommError, match=bad):
        route_interface(bad)

    def no_such_name(*_a, **_k):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    with pytest.raises(CommError, match="no-such-host.invalid"):
        route_interface("no-such-host.invalid")


def test_unknown_iface_lists_the_interfaces_that_exist():
    with pytest.raises(CommError, match=r"no-such-if0.*\blo\b"):
        Comm(0, 2, "127.0.0.1:1", timeout_s=1, iface="no-such-if0")


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def _netns_usable() -> str | None:
    """Why the namespace test cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"`ip netns` is unavailable: {r.stderr.strip()}"
    return None


@pytest.fixture
def two_hosts():
    """Namespaces A and B joined by a veth pair on a random 10.x.y.0/24; yields (A, B, A's address).
    Deleting a namespace deletes its veth end, so teardown is the two deletions (also after a failed set-up)."""
    why = _netns_usable()
    if why:
        pytest.skip(why)
    pid = os.getpid()
    a, b = f"edgefed-{pid}-a", f"edgefed-{pid}-b"
    va, vb = f"efa{pid}"[:15], f"efb{pid}"[:15]
    net = f"10.{random.randrange(0, 255)}.{random.randrange(0, 256)}"  # 10.255.*.* left alone
    made: list[str] = []
    try:
        for ns in (a, b):
            _ip("netns", "add", ns)
            made.append(ns)
        # Both ends are born inside the namespaces: nothing is ever added to this host's own namespace.
        _ip("link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b)
        for ns, dev, host in ((a, va, 1), (b, vb, 2)):
            _ip("-n", ns, "addr", "add", f"{net}.{host}/24", "dev", dev)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
        yield a, b, f"{net}.1", va
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.mark.slow
def test_ranks_in_two_namespaces_form_a_group_without_gloo_socket_ifname(two_hosts, tmp_path):
    ns_a, ns_b, master_ip, veth_a = two_hosts
    make_checkpoint(tmp_path / "m")
    write_shards(tmp_path / "m", tmp_path / "s", 2)
    ref = generate(load_model(tmp_path / "m"), PROMPT, NEW_TOKENS).token_ids
    env = {k: v for k, v in os.environ.items() if k not in ("GLOO_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT")}

    def in_ns(ns: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", ns, sys.executable, *argv]

    # Each rank would find its own interface: the veth end in A, which holds the master's address.
    r = subprocess.run(in_ns(ns_a, "-c", f"from edge_node.collectives import route_interface as r; "
                                         f"print(r('{master_ip}'))"),
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == veth_a, r.stderr
    # A namespace with no route to an address: CommError, nothing sent.
    r = subprocess.run(in_ns(ns_a, "-c", "from edge_node.collectives import route_interface as r; r('192.0.2.1')"),
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "CommError" in r.stderr and "192.0.2.1" in r.stderr

    master = f"{master_ip}:{random.randrange(20000, 60000)}"  # the namespaces are fresh: no port is taken
    procs = []
    try:
        for rank, ns in ((0, ns_a), (1, ns_b)):
            procs.append(subprocess.Popen(
                in_ns(ns, "-m", "edgefed", "tp-generate", "--shards", str(tmp_path / "s"), "--rank", str(rank),
                      "--master-addr", master, "--prompt-ids", ",".join(map(str, PROMPT)),
                      "--max-new-tokens", str(NEW_TOKENS), "--greedy", "--json", "--timeout", "60"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        outs = [p.communicate(timeout=RANK_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:  # after a timeout or a failure: no rank outlives the test
            if p.poll() is None:
                p.kill()
                p.communicate()
    for rank, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"rank {rank}: {err}"
    assert json.loads(outs[0][0])["token_ids"] == ref
    assert outs[1][0].strip() == ""  # only rank 0 reports
