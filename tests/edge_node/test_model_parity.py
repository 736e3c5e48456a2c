"""edgefed's runtime computes what transformers computes: logits within 1e-4, identical greedy tokens."""

from __future__ import annotations

import pytest
import torch

from edge_node.model import SamplingConfig, generate, load_model
from tests.checkpoints import make_checkpoint

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

VARIANTS = {
    "llama-untied": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tie=True),
    "llama3-rope-scaling": dict(arch="llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "llama-mha-bias": dict(arch="llama", num_key_value_heads=8, attention_bias=True, mlp_bias=True),
    "llama-mqa": dict(arch="llama", num_key_value_heads=1),
    "llama-sharded": dict(arch="llama", max_shard_size="100KB"),
    "llama-bf16-weights": dict(arch="llama", dtype=torch.bfloat16),
    "llama-fp16-weights": dict(arch="llama", dtype=torch.float16),
    "mistral-sliding-window": dict(arch="mistral", sliding_window=16),
    "qwen2-qkv-bias": dict(arch="qwen2", tie=True),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = make_checkpoint(path, **VARIANTS[request.param])
    return request.param, path, ref


def prompt(n: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pack", [False, True], ids=["plain", "onednn-packed"])
def test_full_forward_logits_match_transformers(pair, pack):
    name, path, ref = pair
    ids = prompt()
    with torch.no_grad():
        expected = ref(ids).logits
    model = load_model(path, pack=pack)
    got = model(ids, model.new_cache())
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4, name


@pytest.mark.parametrize("pack", [False, True], ids=["plain", "onednn-packed"])
def test_32_greedy_tokens_identical_to_transformers_generate(pair, pack):
    name, path, ref = pair
    ids = prompt(seed=1)
    expected = ref.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate(load_model(path, pack=pack), ids[0].tolist(), 32).token_ids
    assert got == expected[0, ids.shape[1]:].tolist(), name


def test_repetition_penalty_greedy_tokens_identical_to_transformers_generate(tmp_path):
    ref = make_checkpoint(tmp_path / "m", arch="llama")
    ids = prompt(seed=2)
    for penalty in (0.8, 1.3):  # below 1 favours repeats, above 1 penalises them: both signs of logits matter
        expected = ref.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0,
                                repetition_penalty=penalty)
        plain = generate(load_model(tmp_path / "m"), ids[0].tolist(), 32).token_ids
        got = generate(load_model(tmp_path / "m"), ids[0].tolist(), 32,
                       SamplingConfig(repetition_penalty=penalty)).token_ids
        assert got == expected[0, ids.shape[1]:].tolist(), penalty
        assert got != plain, penalty  # the penalty really changed the output on this model


def test_a_checkpoint_split_over_files_loads_the_same_model_as_one_file(tmp_path):
    """edgefed follows model.safetensors.index.json across the files; also guards the sharded variant above
    against passing only because the checkpoint was never really split."""
    make_checkpoint(tmp_path / "one")
    make_checkpoint(tmp_path / "many", max_shard_size="100KB")  # the same seed: the same weights
    assert (tmp_path / "many" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "many").glob("model-*.safetensors"))) > 1
    ids = prompt()
    one, many = load_model(tmp_path / "one"), load_model(tmp_path / "many")
    assert torch.equal(many(ids, many.new_cache()), one(ids, one.new_cache()))


def test_sliding_window_changes_logits_beyond_the_window(tmp_path):
    """Guards the Mistral variant above against passing only because the window never bites."""
    make_checkpoint(tmp_path, arch="mistral", sliding_window=16)
    model = load_model(tmp_path)
    ids = prompt()
    windowed = model(ids, model.new_cache())
    for block in model.blocks.values():
        block.window = None
    full = model(ids, model.new_cache())
    assert torch.allclose(windowed[:, :16], full[:, :16], atol=1e-5)
    assert (windowed[:, 17:] - full[:, 17:]).abs().max() > 1e-3
