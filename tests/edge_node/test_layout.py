"""The weight-layout table drives fusing, tensor-parallel slicing and un-fusing consistently."""

from __future__ import annotations

import torch

from edge_node.model import layout
from edge_node.model.checkpoint import Checkpoint
from edge_node.model.config import ModelConfig
from edge_node.shard import make_plan, slice_layer
from tests.checkpoints import make_checkpoint


def test_every_peft_target_module_maps_onto_one_runtime_linear():
    assert layout.PEFT_TARGETS == {"q_proj": ("wqkv", 0), "k_proj": ("wqkv", 1), "v_proj": ("wqkv", 2),
                                   "o_proj": ("wo", 0), "gate_proj": ("w13", 0), "up_proj": ("w13", 1),
                                   "down_proj": ("w2", 0)}


def test_unfuse_gives_back_the_checkpoint_tensors(tmp_path):
    make_checkpoint(tmp_path, attention_bias=True, mlp_bias=True)
    cfg, ckpt = ModelConfig.from_dir(tmp_path), Checkpoint(tmp_path)
    fused = layout.fuse_layer(ckpt.get, cfg, 1)
    for spec in layout.LINEARS:
        for part, w, b in zip(spec.parts, layout.unfuse(cfg, spec, fused[spec.name]),
                              layout.unfuse(cfg, spec, fused[spec.bias]), strict=True):
            assert torch.equal(w, ckpt.get(f"model.layers.1.{part.module}.weight"))
            assert torch.equal(b, ckpt.get(f"model.layers.1.{part.module}.bias"))


def test_rank_slices_partition_every_linear(tmp_path):
    """Rows linears: the ranks' rows together are every row once; cols linears: every column once."""
    make_checkpoint(tmp_path, num_key_value_heads=4, attention_bias=True, mlp_bias=True)
    cfg, ckpt = ModelConfig.from_dir(tmp_path), Checkpoint(tmp_path)
    fused = layout.fuse_layer(ckpt.get, cfg, 0)
    plan = make_plan(cfg, 3, [3, 2, 1])
    parts = [slice_layer(fused, cfg, s) for s in plan.slices]
    for spec in layout.LINEARS:
        if spec.split == "cols":
            assert torch.equal(torch.cat([p[spec.name] for p in parts], dim=1), fused[spec.name])
            assert [spec.bias in p for p in parts] == [True, False, False]  # added once, after the allreduce
            continue
        per_part = [layout.unfuse(cfg, spec, fused[spec.name])[i] for i in range(len(spec.parts))]
        for i, whole in enumerate(per_part):  # each part's rows, rank by rank, rebuild the part
            got = []
            for s, p in zip(plan.slices, parts, strict=True):
                (lo, hi), = [r for j, r in enumerate(layout.part_rows(cfg, spec, s.units(cfg))) if j == i]
                start = sum(b - a for a, b in layout.part_rows(cfg, spec, s.units(cfg))[:i])
                got.append(p[spec.name][start: start + hi - lo])
            assert torch.equal(torch.cat(got), whole), (spec.name, i)
