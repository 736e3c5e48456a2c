"""edge_node.model.sampling: seeded sampling is reproducible, top-k 1 is greedy, top-p keeps the nucleus."""

from __future__ import annotations

import torch

from edge_node.model import SamplingConfig, generate, load_model
from edge_node.model.sampling import Sampler


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(llama_dir):
    model = load_model(llama_dir)
    cfg = SamplingConfig(greedy=False, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    a = generate(model, [5, 6, 7], 24, cfg).token_ids
    b = generate(model, [5, 6, 7], 24, cfg).token_ids
    assert a == b
    assert a != generate(model, [5, 6, 7], 24).token_ids


def test_top_k_1_is_greedy_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert Sampler(SamplingConfig(greedy=False, top_k=1, seed=0))(logits) == 1
    tiny_p = Sampler(SamplingConfig(greedy=False, top_p=0.01, seed=0))
    assert {tiny_p(logits) for _ in range(20)} == {1}
