"""Helpers for early-exit tests: exit heads that make a wrong hidden state visible, the full model's hidden states."""

from __future__ import annotations

import torch

from edge_node.early_exit import ExitHeads, confidence


def noisy_heads(model, layers, seed: int = 0) -> ExitHeads:
    """Heads with random (not identity) adapters and sharpened norms: a spread of confidences, and a wrong
    hidden state would show in their tokens."""
    heads = ExitHeads.untrained(model.config, layers, model.norm.weight)
    g = torch.Generator().manual_seed(seed)
    for head in heads.heads.values():
        head.adapter_w.data = torch.randn(head.adapter_w.shape, generator=g) * 0.3
        head.norm.data = head.norm.data * 4
    return heads.requires_grad_(False)


@torch.inference_mode()
def hidden_by_layer(model, seq, layers):
    """({layer: (S, hidden) input of that layer, L: last layer's output}, the full model's KV cache)."""
    cache, h, frm, out = model.new_cache(), model.embed_tokens(torch.tensor([seq])), 0, {}
    for b in [*layers, model.config.num_layers]:
        h = model.forward_range(h, cache, 0, frm, b)
        out[b], frm = h[0], b
    return out, cache


def median_threshold(model, heads, seq, layer) -> float:
    """The median max-probability of the exit head at `layer` over seq's positions (about half exit there)."""
    hs, _ = hidden_by_layer(model, seq, heads.layers)
    conf = [confidence(heads.logits(layer, hs[layer][p], model.head))[0] for p in range(len(seq))]
    return float(torch.tensor(conf).median())


@torch.inference_mode()
def expected_token(model, heads, hs, layer: int, pos: int) -> int:
    """Greedy token at position pos from the head at `layer` (the model's own at L) on the exact hidden state."""
    if layer == model.config.num_layers:
        return int(torch.argmax(model.logits(hs[layer][None, pos:pos + 1])[0, 0]))
    return int(torch.argmax(heads.logits(layer, hs[layer][pos], model.head)))
