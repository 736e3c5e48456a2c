"""A fleet deployment with exit heads and a cloud tier (`edgefed deploy --exit-heads ... --cloud ...`): a real
coordinator and two node daemons running `edgefed serve` ranks of the demo model on loopback; the heads travel to
the ranks like the shards; OpenAI requests with early_exit get single-node early exit's tokens and a usage split."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from coordinator.cloud_server import CloudServer, cloud_manager
from edge_node.cloud_link import EarlyExitOptions, run_early_exit
from edge_node.early_exit import save_exit_heads
from edge_node.model import SamplingConfig, Tokenizer, load_model
from edge_node.model.decode import generate
from edge_node.model.generation_config import eos_ids, repetition_penalty
from tests.coordinator.fleet import Fleet, wait_until
from tests.coordinator.test_fleet_e2e import DEMO
from tests.exits import median_threshold, noisy_heads

pytestmark = pytest.mark.slow
EXITS, K, N = (2, 4), 4, 16
PROMPT = "def fibonacci(n):"


def test_a_fleet_deployment_with_exit_heads_answers_early_exit_requests_with_a_usage_split(tmp_path):
    model = load_model(DEMO)
    heads = noisy_heads(model, EXITS)
    (tmp_path / "heads").mkdir()
    path = save_exit_heads(heads, tmp_path / "heads" / "exits.json")
    ids = Tokenizer.from_dir(DEMO).encode(PROMPT)
    sampling = SamplingConfig(greedy=True, repetition_penalty=repetition_penalty(DEMO))
    eos = eos_ids(DEMO, model.config)
    ref = generate(model, ids, N, sampling, eos).token_ids
    threshold = round(median_threshold(model, heads, ids + ref, EXITS[0]), 6)
    direct = run_early_exit(str(DEMO), ids, N, sampling, eos, EarlyExitOptions(str(path), threshold, split=K))
    assert len(direct["usage"]) >= 2, direct["usage"]  # a real mix of exits
    cloud = CloudServer(cloud_manager(DEMO, K)).start()
    (tmp_path / "fleet").mkdir()
    fleet = Fleet(tmp_path / "fleet", heartbeat=0.3, lost_after=3.0)
    try:
        fleet.start_coordinator()
        token, key = fleet.token(), fleet.admin_key()
        for name in ("a", "b"):
            fleet.start_node(name, token, rank_mode=None)
        wait_until(lambda: all(fleet.node_state(n) == "alive" for n in "ab"), 60, "both nodes to register")
        out = subprocess.run([sys.executable, "-m", "edgefed", "deploy", "--coordinator", fleet.http, "--model",
                              str(DEMO), "--nodes", "2", "--admin-key", key, "--wait", "120", "--json",
                              "--exit-heads", str(path), "--exit-threshold", str(threshold), "--exit-mode",
                              "standalone", "--cloud", f"127.0.0.1:{cloud.port}", "--exit-split", str(K)],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        dep = json.loads(out.stdout)
        assert dep["world"] == 2 and dep["assignments"][0]["files"] > 0

        def ask(**early_exit) -> dict:
            r = httpx.post(f"http://{fleet.http}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                           timeout=120, json={"model": "edgefed-demo", "prompt": PROMPT, "max_tokens": N,
                                              "temperature": 0, "return_token_ids": True, "early_exit": early_exit})
            assert r.status_code == 200, r.text
            return r.json()

        body = ask(mode="standalone", threshold=threshold)
        assert body["choices"][0]["token_ids"] == direct["token_ids"]
        assert body["usage"]["exits"]["per_exit"] == direct["usage"] and body["usage"]["cloud"] == "none"
        body = ask(mode="collaborative", threshold=threshold)
        usage = body["usage"]
        assert usage["cloud"] == "used" and usage["exits"]["cloud"] > 0, usage
        assert usage["exits"]["edge"] + usage["exits"]["cloud"] == usage["completion_tokens"]
        body = ask(mode="off")
        assert body["choices"][0]["token_ids"] == ref and body["usage"]["exits"]["per_exit"] == {"edge@6": N}
    finally:
        fleet.close()
        cloud.stop()
