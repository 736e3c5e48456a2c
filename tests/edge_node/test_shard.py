"""The TP plan (pure) and the streaming sharder: uneven splits, exact reassembly, manifest, checksums."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from edge_node.memory import ShardReader
from edge_node.model import ModelConfig
from edge_node.model.checkpoint import Checkpoint
from edge_node.model.layout import fuse_layer
from edge_node.shard import Manifest, ShardError, make_plan, slice_layer, split_by_ratio, write_shards
from tests.checkpoints import make_checkpoint


@pytest.mark.parametrize("total, ratios, expected", [
    (8, [1, 1], [4, 4]), (8, [3, 1], [6, 2]), (4, [3, 2, 1], [2, 1, 1]), (160, [2, 1], [107, 53]),
    (7, [1, 1, 1], [3, 2, 2]), (3, [100, 1, 1], [1, 1, 1]),
])
def test_split_by_ratio_is_proportional_exhaustive_and_at_least_one(total, ratios, expected):
    parts = split_by_ratio(total, ratios)
    assert parts == expected and sum(parts) == total


def test_more_nodes_than_kv_heads_gives_some_ranks_mlp_columns_only(llama_dir):
    cfg = ModelConfig.from_dir(llama_dir)  # 2 KV heads, 160 MLP columns
    plan = make_plan(cfg, 3)
    assert [s.kv_heads for s in plan.slices] == [(0, 1), (1, 2), (2, 2)]
    assert [s.mlp for s in plan.slices] == [(0, 64), (64, 128), (128, 160)]
    assert [s.kv_heads for s in make_plan(cfg, 2, [1, 9]).slices] == [(0, 1), (1, 2)]  # N <= kv: each gets one


def test_plan_rejects_mismatched_or_non_positive_ratios(llama_dir):
    cfg = ModelConfig.from_dir(llama_dir)
    with pytest.raises(ShardError, match="2 values for 1 nodes"):
        make_plan(cfg, 1, [1, 2])
    with pytest.raises(ShardError, match="positive"):
        make_plan(cfg, 2, [1, 0])


def test_plan_covers_every_kv_head_and_mlp_column_once(tmp_path):
    make_checkpoint(tmp_path, num_key_value_heads=4)
    plan = make_plan(ModelConfig.from_dir(tmp_path), 3, [3, 2, 1])
    assert [s.kv_heads for s in plan.slices] == [(0, 2), (2, 3), (3, 4)]
    assert [s.mlp for s in plan.slices] == [(0, 64), (64, 128), (128, 160)]  # whole 32-column units


def test_rank_slices_sum_to_the_full_layer(tmp_path):
    """Column-split o_proj/down_proj partial products add up to the unsplit ones: the allreduce contract."""
    make_checkpoint(tmp_path, num_key_value_heads=4, attention_bias=True, mlp_bias=True)
    cfg = ModelConfig.from_dir(tmp_path)
    ckpt = Checkpoint(tmp_path)
    full = fuse_layer(lambda n: ckpt.get(n, torch.float32), cfg, 1)
    plan = make_plan(cfg, 3, [1, 2, 1])
    parts = [slice_layer(full, cfg, s) for s in plan.slices]
    x = torch.randn(5, cfg.head_dim * cfg.num_attention_heads)
    y = torch.randn(5, cfg.intermediate_size)
    s0 = [s.mlp for s in plan.slices]
    q_cols = [(s.kv_heads[0] * cfg.kv_groups * cfg.head_dim, s.kv_heads[1] * cfg.kv_groups * cfg.head_dim)
              for s in plan.slices]
    o = sum(x[:, a:b] @ p["wo"].T + p.get("bo", 0) for p, (a, b) in zip(parts, q_cols, strict=True))
    down = sum(y[:, a:b] @ p["w2"].T + p.get("b2", 0) for p, (a, b) in zip(parts, s0, strict=True))
    assert torch.allclose(o, x @ full["wo"].T + full["bo"], atol=1e-5)
    assert torch.allclose(down, y @ full["w2"].T + full["b2"], atol=1e-5)
    assert sum(p["wqkv"].shape[0] for p in parts) == full["wqkv"].shape[0]
    assert "bo" in parts[0] and "bo" not in parts[1] and "b2" not in parts[2]


def test_manifest_lists_every_file_with_size_sha256_and_config(llama_dir, tmp_path):
    write_shards(llama_dir, tmp_path / "s", 2, [2, 1])
    raw = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert raw["config"] == json.loads((llama_dir / "config.json").read_text())
    kinds = sorted((f["rank"], f["kind"]) for f in raw["files"])
    assert kinds.count((0, "layer")) == 4 and kinds.count((1, "layer")) == 4
    assert (0, "embed") in kinds and (0, "head") in kinds and (1, "embed") not in kinds
    for f in raw["files"]:
        assert (tmp_path / "s" / f["path"]).stat().st_size == f["bytes"] and len(f["sha256"]) == 64
        assert all(set(t) == {"shape", "dtype"} for t in f["tensors"].values())
    m = Manifest.load(tmp_path / "s")
    assert [f.layer for f in m.stream_files(1)] == [0, 1, 2, 3]
    assert m.stream_files(0)[-1].kind == "head"


def test_a_rank_loads_with_only_its_own_files_present(llama_dir, tmp_path):
    from edge_node.model.errors import CheckpointError
    from edge_node.shard import rank_paths

    raw = write_shards(llama_dir, tmp_path / "s", 2, [2, 1])
    for rank in (0, 1):  # a node sent only this rank's files (plus manifest and model files)
        d = tmp_path / f"only{rank}"
        shutil.copytree(tmp_path / "s", d)
        for f in raw["files"]:
            if f["path"] not in rank_paths(raw, rank):
                (d / f["path"]).unlink()
        m = Manifest.load(d, rank=rank)
        assert all(f.path.is_file() for f in m.stream_files(rank))
        assert m.plan.nodes == 2 and len(m.files) == len(raw["files"])  # the whole manifest is still checked
        with pytest.raises(CheckpointError, match=f"missing shard file.*rank {1 - rank}"):
            Manifest.load(d)  # the default still wants every rank's files
        with pytest.raises(CheckpointError, match="missing shard file"):
            Manifest.load(d, rank=1 - rank)
    assert {f["kind"] for f in raw["files"] if f["path"] in rank_paths(raw, 1)} == {"layer"}  # no embed/head
    (tmp_path / "only1" / "rank1" / "layer0002.safetensors").write_bytes(b"short")
    with pytest.raises(CheckpointError, match="5 bytes on disk"):
        Manifest.load(tmp_path / "only1", rank=1)
    with pytest.raises(ShardError, match="rank 2 is not one of this 2-node plan's ranks"):
        Manifest.load(tmp_path / "s", rank=2)


def test_head_is_chunked_no_bigger_than_a_layer(tmp_path):
    make_checkpoint(tmp_path / "m", vocab_size=4000)
    m = write_shards(tmp_path / "m", tmp_path / "s", 1)
    layer = max(f["bytes"] for f in m["files"] if f["kind"] == "layer")
    heads = [f for f in m["files"] if f["kind"] == "head"]
    assert len(heads) > 1 and all(f["bytes"] <= layer + 1024 for f in heads)
    assert heads[0]["vocab"][0] == 0 and heads[-1]["vocab"][1] == 4000


def test_checksum_mismatch_names_the_file(llama_dir, tmp_path):
    from edge_node.shard import ShardChecksumError

    write_shards(llama_dir, tmp_path / "s", 2)
    m = Manifest.load(tmp_path / "s")
    victim = m.stream_files(1)[2]
    data = bytearray(victim.path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight
    victim.path.write_bytes(bytes(data))
    with pytest.raises(ShardChecksumError, match=str(victim.path)):
        ShardReader().read(victim)


def test_bfloat16_shards_halve_the_bytes(llama_dir, tmp_path):
    f32 = write_shards(llama_dir, tmp_path / "f", 1)
    bf = write_shards(llama_dir, tmp_path / "b", 1, weights="bfloat16")
    total = lambda m: sum(f["bytes"] for f in m["files"])  # noqa: E731
    assert 0.45 < total(bf) / total(f32) < 0.55


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_streamed_embedding_file_reads_back_exactly(tmp_path, weights):
    from safetensors.torch import load_file

    from quant.int8 import quantize_rows

    make_checkpoint(tmp_path / "m", vocab_size=3000)
    write_shards(tmp_path / "m", tmp_path / "s", 1, weights=weights)
    got = load_file(str(tmp_path / "s" / "rank0" / "embed.safetensors"))
    src = Checkpoint(tmp_path / "m")
    table = src.get("model.embed_tokens.weight", torch.float32)
    if weights == "int8":
        q, scale = quantize_rows(table)
        assert torch.equal(got["embed"], q) and torch.equal(got["embed.scale"], scale)
    else:
        assert torch.equal(got["embed"], table)
    assert torch.equal(got["norm"], src.get("model.norm.weight", torch.float32))


@pytest.mark.slow
def test_sharding_peak_memory_does_not_grow_with_depth(tmp_path):
    """The sharder streams layer by layer: 4x the layers must not mean more peak memory."""
    import subprocess
    import sys

    width = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4)
    peaks = {}
    for layers in (6, 24):
        make_checkpoint(tmp_path / f"m{layers}", num_hidden_layers=layers, **width)
        for weights in ("float32", "int8"):
            r = subprocess.run([sys.executable, "-m", "edgefed", "shard", "--model", str(tmp_path / f"m{layers}"),
                                "--nodes", "2", "--weights", weights, "--out", str(tmp_path / f"s{layers}{weights}"),
                                "--json"], capture_output=True, text=True, check=True)
            peaks[layers, weights] = json.loads(r.stdout)["peak_rss_mb"]
    layer_mb = sum(f.stat().st_size for f in (tmp_path / "m24").glob("*.safetensors")) / 24 / 2**20
    for weights in ("float32", "int8"):
        grew = peaks[24, weights] - peaks[6, weights]
        print(f"{weights}: peak {peaks[6, weights]:.0f} MiB at 6 layers, {peaks[24, weights]:.0f} MiB at 24 "
              f"(a layer is {layer_mb:.0f} MiB)")
        assert grew < 3 * layer_mb, (weights, peaks)  # holding the model would add 18 layers
