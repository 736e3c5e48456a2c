"""One decoder over [start, end): ranges compose, and incremental decode equals a full forward."""

from __future__ import annotations

import pytest
import torch

from edge_node.model import load_model


def test_layers_0_k_then_k_L_equals_0_L_with_their_caches(llama_dir):
    full = load_model(llama_dir)
    edge = load_model(llama_dir, start=0, end=2)
    cloud = load_model(llama_dir, start=2, end=4)
    assert edge.lm_head is None and cloud.embed is None
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    c_full, c_edge, c_cloud = full.new_cache(), edge.new_cache(), cloud.new_cache()
    expected = full(ids[:, :20], c_full)
    h = edge.forward_range(edge.embed_tokens(ids[:, :20]), c_edge, 0, 0, 2)
    got = cloud.logits(cloud.forward_range(h, c_cloud, 0, 2, 4))
    assert (got - expected).abs().max() < 1e-5
    assert set(c_edge.layers) == {0, 1} and set(c_cloud.layers) == {2, 3}
    for pos in range(20, 24):  # then token by token, each part keeping its own KV
        step = ids[:, pos : pos + 1]
        expected = full(step, c_full, pos)
        h = edge.forward_range(edge.embed_tokens(step), c_edge, pos, 0, 2)
        got = cloud.logits(cloud.forward_range(h, c_cloud, pos, 2, 4))
        assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("pack", [False, True])
def test_incremental_decode_matches_one_full_forward(llama_dir, pack):
    model = load_model(llama_dir, pack=pack)
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(1))
    full = model(ids, model.new_cache())
    cache = model.new_cache()
    parts = [model(ids[:, :7], cache, 0), model(ids[:, 7:19], cache, 7)]  # chunked prefill too
    parts += [model(ids[:, p : p + 1], cache, p) for p in range(19, 30)]
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-5


def test_bfloat16_compute_stays_close_to_float32(llama_dir):
    ids = torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    f32 = load_model(llama_dir)(ids, load_model(llama_dir).new_cache())
    bf = load_model(llama_dir, torch.bfloat16)
    out = bf(ids, bf.new_cache())
    assert out.dtype == torch.bfloat16
    assert (out.float() - f32).abs().max() < 0.1
