"""Early exit with a tensor-parallel edge (`tp-generate --exits`), ranks as real processes on loopback: exits
that never fire are the full model, mixed exits give single-node early exit's tokens, and every token the cloud
tier answers is the full model's greedy token for the same prefix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from coordinator.cloud_server import CloudServer, cloud_manager
from edge_node.early_exit import ExitPolicy, generate_standalone, save_exit_heads
from edge_node.model import load_model
from edge_node.model.decode import generate
from edge_node.shard import write_shards
from tests.checkpoints import make_checkpoint
from tests.exits import median_threshold, noisy_heads

PROMPT = [5, 9, 33, 2, 100, 7, 64, 12]
EXITS, K, NEW = (2, 4), 4, 16
IDS = ",".join(map(str, PROMPT))


@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    """A 6-layer model, its shards for 2 uneven ranks, noisy exit heads at 2 and 4, a threshold between."""
    path = tmp_path_factory.mktemp("tpexit")
    make_checkpoint(path / "m", num_hidden_layers=6, seed=3)
    write_shards(path / "m", path / "s", 2, [2, 1])
    model = load_model(path / "m")
    heads = noisy_heads(model, EXITS)
    save_exit_heads(heads, path / "exits.json")
    ref = PROMPT + generate(model, PROMPT, 32).token_ids
    threshold = round(median_threshold(model, heads, ref, EXITS[0]), 6)
    return path, model, heads, threshold


def tp_generate(shards, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "edgefed", "tp-generate", "--shards", str(shards), "--prompt-ids", IDS,
                        "--max-new-tokens", str(NEW), "--threads", "1", "--timeout", "30", "--json", *args],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow
def test_tp_exits_that_never_fire_are_the_full_model(tp):
    path, model, _, _ = tp
    expected = generate(model, PROMPT, NEW).token_ids
    # 1.0: no probability exceeds it, so every head is consulted and none taken
    out = tp_generate(path / "s", "--exits", str(path / "exits.json"), "--threshold", "1")
    assert out["token_ids"] == expected and out["usage"] == {"edge@6": NEW} and out["nodes"] == 2
    assert len(set(out["per_rank_config_sha256"])) == 1


@pytest.mark.slow
def test_tp_standalone_exits_equal_single_node_early_exit(tp):
    path, model, heads, threshold = tp
    local = generate_standalone(model, heads, ExitPolicy.uniform(EXITS, threshold), PROMPT, NEW)
    assert len(local.usage()) >= 2, local.usage()  # tokens leave at an exit and at the end: the mix is tested
    out = tp_generate(path / "s", "--exits", str(path / "exits.json"), "--threshold", str(threshold))
    assert out["token_ids"] == local.token_ids
    assert out["token_where"] == [r.key for r in local.records] and out["exit_mode"] == "standalone"
    assert out["edge_layer_evals"] == local.edge_layer_evals  # the same catch-up chunks on the group


@pytest.mark.slow
def test_tp_collaborative_cloud_answers_are_the_full_models(tp):
    path, model, _, threshold = tp
    server = CloudServer(cloud_manager(path / "m", K)).start()
    try:
        cloud = f"127.0.0.1:{server.port}"
        out = tp_generate(path / "s", "--exits", str(path / "exits.json"), "--threshold", str(threshold),
                          "--exit-mode", "collaborative", "--cloud", cloud, "--split", str(K))
        naive = tp_generate(path / "s", "--exit-mode", "collaborative", "--cloud", cloud, "--split", str(K))
    finally:
        server.stop()
    assert out["cloud"] == "used" and out["usage"].get("cloud", 0) > 0 and len(out["usage"]) >= 2, out["usage"]
    seq = PROMPT + out["token_ids"]
    with torch.no_grad():
        full = model(torch.tensor([seq]), model.new_cache())[0]  # (S, vocab)
    for i, where in enumerate(out["token_where"]):
        if where == "cloud":  # the full model's greedy token after the same prefix
            assert out["token_ids"][i] == int(torch.argmax(full[len(PROMPT) - 1 + i])), i
    assert out["uplink_bytes"] > 0
    # no heads: every token goes to the cloud (the naive split), the full model's tokens exactly
    assert naive["token_ids"] == generate(model, PROMPT, NEW).token_ids and naive["usage"] == {"cloud": NEW}
