"""The testbed's cloud tier: where its link's latency and bandwidth are emulated (pure), the split read from the
exit heads (a bad file named), its /metrics parsed, and the tier as the testbed starts it (`edgefed cloud-serve`
behind the link relay, loopback) answering an edge's unconfident tokens, removed with the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from emulation.cleanup import Cleanup, run_prefix
from emulation.cloud_tier import CloudTier, CloudTierError, exit_split, link_plan, parse_metrics
from emulation.scenario import parse_scenario

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "edgefed-demo"
EXITS = ROOT / "models" / "edgefed-demo-exits" / "exits.json"


def _scenario(host: str = "cloud", heads: Path | str = EXITS, source: str = "t.toml"):
    raw = {"name": "t", "model": {"path": str(DEMO)}, "nodes": [{"name": "a"}],
           "deployment": {"tensor_parallel": 1, "exit_heads": str(heads), "exit_mode": "collaborative"},
           "cloud": {"host": host, "latency_ms": 15.0, "jitter_ms": 2.0, "bandwidth_mbit": 40.0}}
    return parse_scenario(raw, source)


def test_the_link_is_emulated_where_the_kernel_does_not_shape_it():
    own, beside = _scenario("cloud"), _scenario("coordinator")
    p = link_plan(own, "isolated", "injected")  # its own veth: tbf takes the bandwidth, the relay the latency
    assert (p.delay_ms, p.jitter_ms, p.mbit, p.latency_mode) == (15.0, 2.0, 0.0, "injected")
    assert "40 Mbit/s (tbf)" in p.label and "15 ms one-way +-2 ms (injected by a TCP relay)" in p.label
    p = link_plan(own, "isolated", "netem")  # netem on its veth: the relay adds nothing
    assert (p.delay_ms, p.jitter_ms, p.mbit, p.latency_mode) == (0.0, 0.0, 0.0, "netem")
    for sc, mode in ((beside, "isolated"), (own, "loopback")):  # no veth of its own: the relay does it all
        p = link_plan(sc, mode, "injected")
        assert (p.delay_ms, p.mbit) == (15.0, 40.0) and "40 Mbit/s (injected)" in p.label


def test_the_split_is_the_heads_last_layer_and_a_bad_heads_file_is_named(tmp_path):
    assert exit_split(_scenario()) == 4
    with pytest.raises(CloudTierError, match=r"t\.toml: \[deployment\] exit_heads: no such file .*nope\.json"):
        exit_split(_scenario(heads=tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "something-else", "layers": [2]}))
    with pytest.raises(CloudTierError, match=r"exit_heads: .*bad\.json is not an edgefed exit-head file"):
        exit_split(_scenario(heads=bad))


def test_metrics_page_is_read_by_name():
    page = ("# HELP edgefed_cloud_sessions x\n# TYPE edgefed_cloud_sessions gauge\nedgefed_cloud_sessions 2.0\n"
            "edgefed_cloud_requests_total 17.0\nedgefed_cloud_requests_created 1.7e9\n"
            "edgefed_cloud_memory_used_bytes 1048576.0\nother_metric 3\n")
    assert parse_metrics(page) == {"sessions": 2.0, "requests": 17.0, "memory_used_bytes": 1048576.0}


@pytest.mark.slow
def test_the_tier_answers_an_edge_through_its_link_and_goes_with_the_run(tmp_path):
    if not (DEMO / "model.safetensors").is_file():
        pytest.skip(f"needs the demo model at {DEMO}")
    from emulation.fleet import Fleet
    from emulation.testbed import _free_port

    sc = _scenario("cloud", source=str(tmp_path / "t.toml"))
    with Cleanup(run_prefix()) as cleanup:
        fleet = Fleet(sc, cleanup.prefix, cleanup, tmp_path / "logs", isolate=False).build()
        tier = CloudTier(sc, fleet, exit_split(sc), _free_port).start(str(DEMO))
        assert tier.address == f"127.0.0.1:{tier.relay_port}" and all(p.proc.poll() is None for p in tier.procs)
        r = subprocess.run([sys.executable, "-m", "edgefed", "generate", "--model", str(DEMO), "--exits", str(EXITS),
                            "--threshold", "0.5", "--exit-mode", "collaborative", "--cloud", tier.address,
                            "--prompt", "def fibonacci(n):", "--max-new-tokens", "12", "--greedy", "--json"],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        out = json.loads(r.stdout[r.stdout.index("{"):])
        assert out["cloud"] == "used" and out["usage"].get("cloud", 0) >= 1, out["usage"]
        stats = tier.stats()
        assert stats["ended"] is None and stats["metrics"]["sessions_opened"] >= 1
        assert stats["metrics"]["tokens_answered"] == out["usage"]["cloud"]
        pids = [p.proc.pid for p in tier.procs]
        assert [p.role for p in tier.procs] == ["cloud-serve", "link-relay"]
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
