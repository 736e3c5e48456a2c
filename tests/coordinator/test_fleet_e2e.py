"""End to end on loopback: `edgefed coordinator`, two `edgefed node` daemons running real `edgefed serve` ranks of
the demo model, all over mutual TLS, `edgefed deploy`, and the `openai` client; then a rank killed mid-stream."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.coordinator.fleet import Fleet, wait_until

pytestmark = pytest.mark.slow
DEMO = Path(__file__).resolve().parents[2] / "models" / "edgefed-demo"
PROMPT = "def fibonacci(n):"


def _reference(max_tokens: int) -> str:
    """Single-node greedy text (the model's own repetition penalty, as the API applies it)."""
    out = subprocess.run([sys.executable, "-m", "edgefed", "generate", "--model", str(DEMO), "--prompt", PROMPT,
                          "--greedy", "--max-new-tokens", str(max_tokens), "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)["text"]


def _rank_pid(fleet: Fleet, node: str) -> int:
    agent = fleet.procs.procs[node].pid
    kids = subprocess.run(["pgrep", "-P", str(agent)], capture_output=True, text=True).stdout.split()
    assert len(kids) == 1, kids
    return int(kids[0])


def test_openai_client_gets_tensor_parallel_completions_and_a_killed_rank_is_replanned(tmp_path):
    openai = pytest.importorskip("openai")
    fleet = Fleet(tmp_path, heartbeat=0.3, lost_after=2.0, tls=True)  # mutual TLS: node <-> coordinator <-> rank 0
    try:
        fleet.start_coordinator()
        token, key = fleet.token(), fleet.admin_key()
        for name in ("a", "b"):
            fleet.start_node(name, token, rank_mode=None)
        wait_until(lambda: all(fleet.node_state(n) == "alive" for n in "ab"), 60, "both nodes to register")
        out = subprocess.run([sys.executable, "-m", "edgefed", "deploy", "--coordinator", fleet.http, "--model",
                              str(DEMO), "--nodes", "2", "--admin-key", key, "--wait", "120", "--json"],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        first = json.loads(out.stdout)
        assert first["world"] == 2 and {a["node_id"] for a in first["assignments"]} == {"a", "b"}

        client = openai.OpenAI(base_url=f"http://{fleet.http}/v1", api_key=key, timeout=120, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["edgefed-demo"]
        ref = _reference(64)
        whole = client.completions.create(model="edgefed-demo", prompt=PROMPT, max_tokens=64, temperature=0)
        assert whole.choices[0].text == ref and whole.usage.completion_tokens == 64
        chunks = client.completions.create(model="edgefed-demo", prompt=PROMPT, max_tokens=64, temperature=0,
                                           stream=True)
        assert "".join(c.choices[0].text for c in chunks) == ref

        # kill rank 1 after 10 streamed chunks: the coordinator re-plans, the request continues on the new group
        rank1 = next(a["node_id"] for a in first["assignments"] if a["rank"] == 1)
        got, killed = [], None
        for c in client.completions.create(model="edgefed-demo", prompt=PROMPT, max_tokens=64, temperature=0,
                                           stream=True):
            got.append(c.choices[0].text)
            if len(got) == 10:
                subprocess.run(["kill", "-KILL", str(_rank_pid(fleet, rank1))], check=True)
                killed = time.monotonic()
        assert killed is not None and time.monotonic() - killed < 90
        assert "".join(got) == ref  # a completed retry: the same greedy text, nothing lost or repeated
        old = fleet.view.get_deployment(first["deployment_id"])
        assert old.state == "stopped" and f"rank 1 on node {rank1} crashed (killed by SIGKILL)" in old.detail
        assert "replaced by" in old.detail
        records = fleet.view.list_requests()
        assert [r.status for r in records] == ["done"] * 3 and records[-1].completion_tokens == 64
        for name in ("a", "b"):
            assert fleet.procs.stop(name) == 0
    finally:
        fleet.close()
