"""Placement as pure functions: nodes + model -> nodes, uneven split ratios, memory budgets (no processes)."""

from __future__ import annotations

import dataclasses

import pytest

from coordinator.placement import (
    MiB,
    ModelFacts,
    NodeFacts,
    PlacementError,
    Policy,
    place,
    rank_needs,
    water_fill,
)
from edge_node.memory import window_for_budget
from edge_node.model.config import ModelConfig
from edge_node.shard import Manifest, make_plan, write_shards
from tests.checkpoints import make_checkpoint

GiB = 2**30
# runtime 8 MiB and a short context keep the numbers readable; the model is ~35 MiB of float32 weights
POLICY = Policy(context_tokens=256, runtime_bytes=8 * MiB)


def model(weights: str = "float32", **overrides) -> ModelFacts:
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 4000, "hidden_size": 256,
           "intermediate_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
           "max_position_embeddings": 1024, **overrides}
    return ModelFacts(ModelConfig.from_dict(raw), weights)


def node(name: str, gflops: float = 10.0, mem_mib: float = 1024, disk_mib: float = 10240, state: str = "ready"):
    return NodeFacts(name, 4, int(mem_mib * MiB), int(disk_mib * MiB), gflops, state)


def _fits(p, nodes, policy=POLICY):
    by = {n.name: n for n in nodes}
    for r in p.ranks:
        n = by[r.node]
        assert r.memory_budget <= policy.memory_fraction * n.memory_available
        assert r.shard_bytes <= policy.disk_fraction * n.disk_free
        assert r.memory_min <= r.memory_budget <= r.memory_full
        assert r.resident == (r.memory_budget == r.memory_full)


def _plan_matches(p, m):
    plan = make_plan(m.config, len(p.ranks), list(p.ratios))  # what the sharder will do with these ratios
    assert [(s.kv_heads, s.mlp) for s in plan.slices] == [(r.kv_heads, r.mlp) for r in p.ranks]


def test_ample_memory_gives_shares_proportional_to_speed():
    m, nodes = model(), [node("a", 10, 4096), node("b", 30, 2048), node("c", 20, 2048), node("d", 20, 2048)]
    p = place(nodes, m, policy=POLICY)
    assert p.nodes == ("a", "b", "c", "d")  # rank 0: most memory; then by speed (c, d tie: by name)
    assert p.ratios == pytest.approx((10 / 80, 30 / 80, 20 / 80, 20 / 80))
    assert p.resident
    _plan_matches(p, m)
    _fits(p, nodes)
    assert [r.kv_heads[1] - r.kv_heads[0] for r in p.ranks] == [1, 1, 1, 1]  # 4 KV heads: at least one each
    mlp = [r.mlp[1] - r.mlp[0] for r in p.ranks]
    assert mlp[1] > mlp[2] > mlp[0]  # MLP columns follow speed


def test_a_node_short_of_memory_gets_less_than_its_speed_share_and_everything_fits():
    m = model()
    full = rank_needs(m, make_plan(m.config, 1).slices[0], POLICY).full  # the whole model on one rank
    nodes = [node("big", 10, full / MiB * 2), node("small", 40, full / MiB * 0.4)]
    p = place(nodes, m, policy=POLICY)
    assert p.resident and p.nodes == ("big", "small")
    assert p.ratios[1] < 0.8  # speed alone would give it 0.8
    assert p.ratios[1] > 0.2  # but it still takes what fits
    _fits(p, nodes)
    _plan_matches(p, m)


def test_streams_through_a_window_when_the_fleet_cannot_hold_the_whole_model():
    m = model()
    full = rank_needs(m, make_plan(m.config, 1).slices[0], POLICY).full
    nodes = [node("a", 10, full / MiB * 0.4), node("b", 10, full / MiB * 0.4)]
    p = place(nodes, m, policy=POLICY)
    assert not p.resident
    _fits(p, nodes)
    for r in p.ranks:  # the engine's window from this budget holds the policy's minimum of blocks
        fixed = POLICY.runtime_bytes + r.kv_bytes
        assert window_for_budget(r.memory_budget, r.block_bytes, fixed, m.config.num_layers) >= POLICY.min_window
    assert p.ranks[0].memory_mb == pytest.approx(p.ranks[0].memory_budget / MiB)


def test_kv_cache_is_reserved_for_the_whole_context_by_default():
    m = model()  # 1024 positions; the serving engine sizes its KV budget for all of them
    p = place([node("a", 10, 4096)], m)
    assert p.context_tokens == 1024
    assert p.ranks[0].kv_bytes == m.kv_bytes_per_token() * 1024 == 2 * 8 * 4 * 32 * 4 * 1024


def test_not_enough_memory_names_what_is_needed_and_available():
    m = model()
    nodes = [node("a", 10, 12), node("b", 10, 10)]
    with pytest.raises(PlacementError) as e:
        place(nodes, m, policy=POLICY)
    msg = str(e.value)
    assert "not enough memory" in msg and "needs" in msg and "MiB" in msg
    assert "a 12 MiB free" in msg and "b 10 MiB free" in msg and "KV cache for 256 tokens" in msg
    with pytest.raises(PlacementError, match="node.s. tiny cannot hold even an even share"):
        place([node("big", 10, 4096), node("tiny", 10, 9)], m, ["big", "tiny"], POLICY)


def test_disk_caps_a_share():
    m = model()
    total = m.total_bytes / MiB
    nodes = [node("a", 10, 4096, disk_mib=total * 2), node("b", 10, 2048, disk_mib=total * 0.2)]
    p = place(nodes, m, policy=POLICY)
    _fits(p, nodes)
    assert p.ratios[1] < 0.5
    with pytest.raises(PlacementError, match="not enough disk for the model on 1 node"):
        place([node("a", 10, 4096, disk_mib=total * 0.1)], m, policy=POLICY)


def test_explicit_node_names_and_counts_are_honoured():
    m = model()
    nodes = [node("a", 50, 2048), node("b", 10, 4096), node("c", 30, 2048), node("d", 5, 2048)]
    assert set(place(nodes, m, ["d", "b"], POLICY).nodes) == {"d", "b"}
    assert place(nodes, m, ["d", "b"], POLICY).nodes[0] == "b"  # rank 0: most memory
    assert set(place(nodes, m, 2, POLICY).nodes) == {"a", "c"}  # the fastest two
    assert len(place(nodes, m, 1, POLICY).ranks) == 1
    assert place(nodes, m, 1, POLICY).ratios == (1.0,)
    assert place(nodes, m, "d", POLICY).nodes == ("d",)  # one name, not its letters


def test_automatic_count_stops_at_the_kv_heads_and_falls_back_to_fewer_nodes():
    m = model(num_key_value_heads=2, num_attention_heads=4)
    nodes = [node(x, 10, 4096) for x in "abcd"]
    assert len(place(nodes, m, policy=POLICY).ranks) == 2
    assert len(place(nodes, m, policy=dataclasses.replace(POLICY, max_nodes=3)).ranks) == 3
    assert len(place(nodes, m, 4, POLICY).ranks) == 4  # asked for: ranks beyond the KV heads hold MLP only


def test_choice_errors_name_the_problem():
    m = model()
    nodes = [node("a"), node("b", state="lost")]
    with pytest.raises(PlacementError, match=r"unknown node\(s\) \['zz'\]"):
        place(nodes, m, ["a", "zz"], POLICY)
    with pytest.raises(PlacementError, match=r"not ready: b \(lost\)"):
        place(nodes, m, ["a", "b"], POLICY)
    with pytest.raises(PlacementError, match="2 node.*asked for, 1 ready"):
        place(nodes, m, 2, POLICY)
    with pytest.raises(PlacementError, match="positive integer"):
        place(nodes, m, 0, POLICY)
    with pytest.raises(PlacementError, match="no ready node"):
        place([node("b", state="lost")], m, policy=POLICY)
    with pytest.raises(PlacementError, match="distinct"):
        place(nodes, m, ["a", "a"], POLICY)
    with pytest.raises(PlacementError, match="unique"):
        place([node("a"), node("a")], m, policy=POLICY)
    with pytest.raises(PlacementError, match="node 'a': gflops must be a positive number"):
        place([node("a", gflops=0)], m, policy=POLICY)
    with pytest.raises(PlacementError, match="weights must be one of"):
        model("float16")
    with pytest.raises(PlacementError, match=r"policy out of range: memory_fraction=1\.5"):
        Policy(memory_fraction=1.5)


def test_replanning_after_a_lost_node_is_the_same_call_on_the_rest():
    m = model()
    full = rank_needs(m, make_plan(m.config, 1).slices[0], POLICY).full
    nodes = [node("a", 10, full / MiB * 0.8), node("b", 20, full / MiB * 0.8), node("c", 30, full / MiB * 0.8)]
    before = place(nodes, m, policy=POLICY)
    assert set(before.nodes) == {"a", "b", "c"} and before.resident
    lost = [dataclasses.replace(n, state="lost") if n.name == "c" else n for n in nodes]
    after = place(lost, m, policy=POLICY)
    assert set(after.nodes) == {"a", "b"}
    _fits(after, lost)
    _plan_matches(after, m)
    alone = [dataclasses.replace(n, state="lost") if n.name != "a" else n for n in nodes]
    p = place(alone, m, policy=POLICY)  # one node at 0.8x of the model: only by streaming
    assert p.nodes == ("a",) and not p.resident


def test_placement_is_deterministic():
    m, nodes = model(), [node("a", 13, 700), node("b", 7, 300), node("c", 29, 500)]
    assert place(nodes, m, policy=POLICY) == place(list(nodes), m, policy=POLICY)


@pytest.mark.parametrize("weights", [[1, 1], [3, 1], [1, 2, 7]])
def test_water_fill_without_caps_is_proportional(weights):
    shares = water_fill(weights, [1.0] * len(weights))
    assert shares == pytest.approx([w / sum(weights) for w in weights])


def test_water_fill_respects_caps_and_shares_the_excess_by_weight():
    shares = water_fill([8, 1, 1], [0.5, 1, 1])
    assert shares == pytest.approx([0.5, 0.25, 0.25])
    shares = water_fill([1, 1, 1], [0.1, 0.2, 0.9])
    assert sum(shares) == pytest.approx(1) and shares[0] == 0.1 and shares[1] == 0.2
    assert water_fill([1, 1], [0.4, 0.5]) is None
    assert water_fill([1, 1], [0.0, 1.0]) is None


@pytest.mark.parametrize("arch, weights", [("llama", "float32"), ("qwen2", "bfloat16"), ("llama", "int8")])
def test_predicted_shard_sizes_match_the_sharder(tmp_path, llama_dir, arch, weights):
    src = llama_dir  # the session's tiny Llama; Qwen2 adds q/k/v biases
    if arch != "llama":
        src = tmp_path / "model"
        make_checkpoint(src, arch=arch, tie=True)
    m = ModelFacts.from_dir(src, weights)
    nodes = [node("a", 10, 4096), node("b", 30, 2048)]
    p = place(nodes, m, policy=POLICY)
    write_shards(src, tmp_path / "shards", len(p.ranks), list(p.ratios), weights)
    man = Manifest.load(tmp_path / "shards")
    assert [(s.kv_heads, s.mlp) for s in man.plan.slices] == [(r.kv_heads, r.mlp) for r in p.ranks]
    for r in p.ranks:
        files = [f for f in man.files if f.rank == r.rank]
        real = sum(f.bytes for f in files)
        assert real <= r.shard_bytes <= real + 4096 * len(files)  # exact up to the safetensors headers
        biggest = max(f.bytes for f in man.stream_files(r.rank))
        assert biggest <= r.block_bytes <= biggest + 4096
