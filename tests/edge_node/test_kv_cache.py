"""The KV cache refuses writes at the wrong position and tells each layer's own length, so deep layers may
lag behind shallow ones (early exit) and catch up later with the same result as running every layer."""

from __future__ import annotations

import pytest
import torch

from edge_node.model import load_model
from edge_node.model.kv_cache import KVCache, KVPositionError


def _kv(n: int) -> torch.Tensor:
    return torch.randn(1, 2, n, 4)  # (B, Hkv, S, D)


def test_a_write_must_append_at_the_layers_length():
    cache = KVCache()
    layer = cache.layer(3, kv_heads=2, head_dim=4)
    layer.update(0, _kv(5), _kv(5))
    with pytest.raises(KVPositionError, match=r"layer 3: write at position 7, but the layer holds 5 tokens"):
        layer.update(7, _kv(1), _kv(1))  # a gap: slots 5 and 6 would be attended uninitialised
    with pytest.raises(KVPositionError, match="position 4"):
        layer.update(4, _kv(1), _kv(1))  # an overlap: would rewrite what earlier queries saw
    layer.update(5, _kv(2), _kv(2))
    assert cache.length(3) == 7 and cache.length(0) == 0


def test_each_layer_keeps_its_own_length():
    cache = KVCache()
    cache.layer(0, 2, 4).update(0, _kv(6), _kv(6))
    cache.layer(1, 2, 4).update(0, _kv(2), _kv(2))
    assert cache.lengths == {0: 6, 1: 2}


def test_deep_layers_that_lag_then_catch_up_equal_running_every_layer_each_step(llama_dir):
    """Layers [0, k) run token by token; [k, L) skip tokens (as after an early exit) and later catch up
    on the stored hidden states of all skipped tokens at once: logits equal the plain run's."""
    torch.manual_seed(0)
    model = load_model(llama_dir)
    L, k = model.config.num_layers, 2
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.inference_mode():
        plain = model(ids, model.new_cache())[0]  # (S, vocab)
        cache = model.new_cache()
        h = model.forward_range(model.embed_tokens(ids[:, :4]), cache, 0, 0, L)  # prompt through every layer
        rows, pending = [model.logits(h)[0]], []
        for pos in range(4, 12):
            shallow = model.forward_range(model.embed_tokens(ids[:, pos: pos + 1]), cache, pos, 0, k)
            pending.append(shallow)
            if pos in (6, 11):  # catch up: the deep layers run every token they skipped, at its own position
                assert cache.length(0) == pos + 1 and cache.length(L - 1) == pos + 1 - len(pending)
                deep = model.forward_range(torch.cat(pending, dim=1), cache, cache.length(k), k, L)
                rows.append(model.logits(deep)[0])
                pending = []
        assert cache.lengths == dict.fromkeys(range(L), 12)
    got = torch.cat(rows)
    assert got.shape == plain.shape
    assert (got - plain).abs().max().item() < 1e-4
    assert torch.equal(got.argmax(-1), plain.argmax(-1))
