"""`edgefed testbed` end to end: a 2-node scenario on the demo model (each node a namespace + cgroup, the
platform's own coordinator, agents, deploy and OpenAI API), a node killed mid-run and the service answering
after it; SIGINT mid-run removes everything; a bad scenario is one clear error."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from emulation.cleanup import leftovers
from emulation.report import PLOTS
from tests.emulation.netutil import why_no_cgroups, why_no_netns

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "edgefed-demo"
TWO_NODES = f"""
name = "two"
[model]
path = "{DEMO}"
[deployment]
tensor_parallel = 2
[workload]
prompts = ["def fibonacci(n):", "The capital of France is"]
max_tokens = 8
concurrency = 2
requests = 4
[[nodes]]
name = "a"
memory_mb = 1024
bandwidth_mbit = 100
latency_ms = 2
[[nodes]]
name = "b"
memory_mb = 1024
bandwidth_mbit = 100
latency_ms = 2
"""
KILL_RANK_1 = """
[[faults]]
at_s = 1
kind = "kill_node"
rank = 1
"""
KILL_B = KILL_RANK_1.replace("rank = 1", 'node = "b"')
NOTHING = {"netns": [], "links": [], "cgroups": []}


def test_bad_scenario_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(TWO_NODES.replace("latency_ms = 2", "latency = 2", 1))
    r = subprocess.run([sys.executable, "-m", "edgefed", "testbed", "--scenario", str(bad)], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2
    assert f"{bad}: [nodes[0]]: unknown field 'latency'" in r.stderr and "Traceback" not in r.stderr


def _isolated() -> None:
    why = why_no_netns() or why_no_cgroups()
    if why:
        pytest.skip(why)
    if not (DEMO / "model.safetensors").is_file():
        pytest.skip(f"needs the demo model at {DEMO}")


def _ours(tmp: Path) -> list[psutil.Process]:
    """Processes still running whose command line names this test's directory (ours, and only ours)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and str(tmp) in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


def _prefix(stderr_line: str) -> str:
    return stderr_line.split(" run ", 1)[1].split(",", 1)[0]


@pytest.mark.slow
def test_two_nodes_end_to_end_and_the_service_survives_a_killed_node(tmp_path):
    _isolated()
    sc = tmp_path / "two.toml"
    sc.write_text(TWO_NODES + KILL_RANK_1)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "edgefed", "testbed", "--scenario", str(sc), "--out", str(out),
                        "--no-progress"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    run = report["run"]
    assert run["mode"] == "isolated" and run["latency_mode"] in ("netem", "injected") and run["error"] is None
    assert leftovers(run["prefix"]) == NOTHING and _ours(tmp_path) == []
    reqs = report["requests"]
    assert all(q["error"] is None and q["tokens"] == 8 for q in reqs), reqs
    assert [q["phase"] for q in reqs].count("after faults") == 2  # the service answered once the node was gone
    fault = report["faults"][0]
    assert fault["result"].startswith("killed ") and fault["applied_s"] >= 1 and fault["rank"] == 1
    killed = fault["node"]  # the node that held rank 1 when the fault fired
    alive = ({"a", "b"} - {killed}).pop()
    assert report["nodes"][killed]["ended"] == "killed by SIGKILL" and report["nodes"][alive]["ended"] is None
    deps = run["deployments"]  # the deploy's group, then the coordinator's re-plan on the node left
    assert sorted(deps[0]["nodes"]) == ["a", "b"] and deps[0]["state"] == "stopped"
    assert deps[-1]["nodes"] == [alive] and deps[-1]["state"] == "running"
    assert report["summary"]["after_fault"] >= 2 and report["summary"]["after_fault_ok"] == \
        report["summary"]["after_fault"]
    for n in (report["nodes"]["a"], report["nodes"]["b"]):
        assert 50 < n["peak_memory_mb"] <= 1024 and n["memory_mb"]  # sampled under the cap
        assert n["tx_bytes"] > 0 and n["rx_bytes"] > 0  # the kernel's counters of its link
    assert all((out / f"{p}.png").is_file() for p in PLOTS) and (out / "index.html").is_file()
    assert "testbed two: isolated nodes" in r.stderr and "b     1024" in r.stderr  # the console table


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_signal_mid_run_removes_everything(tmp_path, sig):
    _isolated()
    sc = tmp_path / "two.toml"
    sc.write_text(TWO_NODES)
    p = subprocess.Popen([sys.executable, "-m", "edgefed", "testbed", "--scenario", str(sc), "--out",
                          str(tmp_path / "out"), "--no-progress"], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        prefix = _prefix(p.stderr.readline())
        agent_log = tmp_path / "out" / "logs" / "b.agent.log"
        deadline = time.monotonic() + 180
        while not agent_log.is_file() and time.monotonic() < deadline:  # the agents are started
            assert p.poll() is None
            time.sleep(0.2)
        assert leftovers(prefix)["netns"] and len(_ours(tmp_path)) >= 3  # coordinator + 2 agents are up
        p.send_signal(sig)
        err = p.communicate(timeout=120)[1]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + sig, err[-2000:]
    assert "everything the run made is removed" in err
    assert leftovers(prefix) == NOTHING
    assert _ours(tmp_path) == []


def test_federated_session_flags_and_rounds_from_its_summary(tmp_path):
    from emulation.federated_phase import fl_argv, rounds_of
    from emulation.scenario import load_scenario

    sc = load_scenario(ROOT / "scenarios" / "heterogeneous-3.toml")
    argv = fl_argv(sc, tmp_path / "fl", 600)
    assert argv[1:5] == ["-m", "edgefed", "fl", "start"]
    assert argv[-1] == "--json"
    flags = dict(zip(argv[5:-1:2], argv[6:-1:2], strict=True))
    assert flags["--rule"] == "fedavg" and flags["--schedule"] == "compass"  # fedcompass
    assert flags["--clients"] == "3" and flags["--memory-mb"] == "512"  # the smallest client's memory
    # desktop 1.0, laptop 0.6, board 0.25 CPUs: slowdowns 1, 1.67, 4 against the fastest
    assert flags["--slowdown"] == "asyncio=1,email=1.67,json=4"
    summary = {"history": [
        {"round": 1, "seconds": 3.0, "bytes_up": 100, "bytes_down": 200,
         "clients": [{"ppl-before": 50.0}, {"ppl-before": 54.0}], "missing_nodes": []},
        {"round": 2, "seconds": 2.5, "bytes_up": 100, "bytes_down": 200,
         "clients": [{"ppl-before": 40.0}, {"ppl-before": 44.0}], "missing_nodes": []}],
        "ppl_after": {"a": 30.0, "b": 32.0}}
    rounds = rounds_of(summary)
    assert [(r["round"], r["perplexity"]) for r in rounds] == [(0, 52.0), (1, 42.0), (2, 31.0)]
    assert rounds[1]["bytes"] == 300 and rounds[2]["wall_s"] == 2.5


@pytest.mark.slow
def test_a_node_over_its_memory_cap_is_reported_as_a_kernel_oom_kill(tmp_path):
    _isolated()
    sc = tmp_path / "oom.toml"
    # node b's cap cannot hold its agent and a torch rank together: the kernel must step in
    sc.write_text(TWO_NODES.replace("requests = 4", "requests = 1").replace('name = "b"\nmemory_mb = 1024',
                                                                           'name = "b"\nmemory_mb = 180'))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "edgefed", "testbed", "--scenario", str(sc), "--out", str(out),
                        "--no-progress"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    report = json.loads((out / "report.json").read_text())
    b = report["nodes"]["b"]
    assert b["oom_kills"] >= 1 and "killed by the kernel OOM killer (memory cap 180 MB, swap off)" in b["ended"]
    assert report["summary"]["oom_kills"] == ["b"] and report["nodes"]["a"]["oom_kills"] == 0
    assert b["peak_memory_mb"] <= 180.5  # held to its cap, not silently allowed more
    assert "OOM killer" in r.stderr  # the console table says so too
    assert leftovers(report["run"]["prefix"]) == NOTHING and _ours(tmp_path) == []


@pytest.mark.slow
def test_loopback_fallback_runs_the_same_scenario_and_says_so(tmp_path):
    if not (DEMO / "model.safetensors").is_file():
        pytest.skip(f"needs the demo model at {DEMO}")
    sc = tmp_path / "two.toml"
    sc.write_text(TWO_NODES.replace("requests = 4", "requests = 2") + KILL_B)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "edgefed", "testbed", "--scenario", str(sc), "--out", str(out),
                        "--no-progress", "--loopback"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    run = report["run"]
    assert run["mode"] == "loopback" and run["why_loopback"] == "loopback asked for"
    assert any(n.startswith("loopback nodes") for n in run["notes"])
    assert all(q["error"] is None for q in report["requests"]) and len(report["requests"]) == 4
    assert report["nodes"]["b"]["ended"] == "killed by SIGKILL" and report["nodes"]["a"]["tx_bytes"] is None
    assert report["nodes"]["a"]["peak_memory_mb"] > 50  # RSS of the agent and its rank
    assert len(report["per_token"]) == 8 and report["probe"]["on"] == ["a", "b"]
    assert _ours(tmp_path) == []  # the killed node's rank child too


EXITS = ROOT / "models" / "edgefed-demo-exits" / "exits.json"
EARLY_EXIT = f"""
exit_heads = "{EXITS}"
exit_threshold = 0.3
exit_mode = "collaborative"
"""
CLOUD = """
[cloud]
host = "cloud"
bandwidth_mbit = 50
latency_ms = 5
[[faults]]
at_s = 12
kind = "kill_node"
node = "cloud"
"""


@pytest.mark.slow
def test_early_exit_with_a_cloud_tier_and_the_edge_answering_alone_once_the_cloud_is_gone(tmp_path):
    """The edge group answers confident tokens, the cloud tier (its own namespace, link and cgroup) the rest;
    after the cloud's host is killed the service still answers, every token at the edge, and says so."""
    _isolated()
    sc = tmp_path / "cloud.toml"
    sc.write_text(TWO_NODES.replace("tensor_parallel = 2\n", "tensor_parallel = 2\n" + EARLY_EXIT)
                  .replace("requests = 4", "requests = 2") + CLOUD)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "edgefed", "testbed", "--scenario", str(sc), "--out", str(out),
                        "--no-progress"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    run, reqs, s = report["run"], report["requests"], report["summary"]
    assert run["early_exit"] == {"heads": str(EXITS), "threshold": 0.3, "mode": "collaborative", "applied": True}
    assert leftovers(run["prefix"]) == NOTHING and _ours(tmp_path) == []
    assert all(q["error"] is None and q["tokens"] == 8 for q in reqs), reqs
    for q in reqs:  # every token answered somewhere, and said where
        x = q["exits"]
        assert x["edge"] + x["cloud"] + x["fallback"] == 8, q
    killed = report["faults"][0]["applied_s"]
    before = [q for q in reqs if q["end_s"] < killed]
    after = [q for q in reqs if q["phase"] == "after faults"]
    assert before and len(after) == 2
    assert all(q["exits"]["cloud_status"] == "used" and q["exits"]["fallback"] == 0 for q in before)
    assert sum(q["exits"]["cloud"] for q in before) >= 1  # the cloud answered the unconfident ones
    for q in after:  # no cloud: the edge's head at k answers, and the response says why
        assert q["exits"]["cloud_status"] in ("unreachable", "lost") and q["exits"]["cloud"] == 0, q
        assert q["exits"]["fallback"] >= 1 and q["exits"].get("cloud_error")
    assert s["tokens_edge"] + s["tokens_cloud"] + s["tokens_cloud_unreachable"] == s["tokens"]
    cloud = report["cloud"]
    assert cloud["host"] == "cloud" and cloud["split"] == 4 and cloud["ended"] == "killed by SIGKILL"
    assert "injected by a TCP relay" in cloud["link"] and cloud["peak_memory_mb"] > 50
    assert cloud["tx_bytes"] > 0 and cloud["rx_bytes"] > 0  # its own link's kernel counters
    assert "early exit (collaborative, threshold 0.3): tokens at the edge" in r.stderr
    assert (out / "exit_split.png").is_file() and "<h2>early exit</h2>" in (out / "index.html").read_text()
