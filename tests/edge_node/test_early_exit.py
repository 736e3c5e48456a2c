"""Early exit on the edge: off is the full model, exited tokens' deep KV is caught up exactly, heads round-trip."""

from __future__ import annotations

import json

import pytest
import torch

from edge_node.early_exit import (
    OFF,
    ExitHeadError,
    ExitPolicy,
    confidence,
    confident,
    generate_standalone,
    load_exit_heads,
    save_exit_heads,
)
from edge_node.model import load_model
from edge_node.model.decode import generate
from edge_node.model.errors import UsageError
from tests.checkpoints import make_checkpoint
from tests.exits import expected_token, hidden_by_layer, median_threshold, noisy_heads

PROMPT = [5, 9, 33, 2, 100, 7, 64, 12]
EXITS = (2, 4)


@pytest.fixture(scope="module")
def six_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("six")
    make_checkpoint(path, num_hidden_layers=6, seed=3)
    return path


@pytest.fixture(scope="module")
def model(six_dir):
    return load_model(six_dir)


def test_exits_off_is_the_full_model_token_for_token(model):
    expected = generate(model, PROMPT, 24).token_ids
    got = generate_standalone(model, noisy_heads(model, EXITS), OFF, PROMPT, 24)
    assert got.token_ids == expected
    assert got.usage() == {f"edge@{model.config.num_layers}": 24}


def test_no_token_crossing_the_threshold_is_the_full_model(model):
    expected = generate(model, PROMPT, 16).token_ids
    # 1.0: a probability never strictly exceeds it; the switch is on, every head is consulted
    got = generate_standalone(model, noisy_heads(model, EXITS), ExitPolicy.uniform(EXITS, 1.0), PROMPT, 16)
    assert got.token_ids == expected and set(got.usage()) == {"edge@6"}


def test_threshold_is_a_strict_comparison():
    logits = torch.tensor([0.0, 0.0])  # max prob exactly 0.5, margin exactly 0
    assert confidence(logits) == (0.5, 0.0)
    assert not confident(logits, 0.5, "max_prob") and confident(logits, 0.4999, "max_prob")
    assert not confident(logits, 0.0, "margin")


def test_mixed_exits_answer_with_the_right_hidden_state_and_catch_up_every_layers_kv(model):
    heads = noisy_heads(model, EXITS)
    ref = PROMPT + generate(model, PROMPT, 32).token_ids
    thresholds = tuple(median_threshold(model, heads, ref, e) for e in EXITS)
    result = generate_standalone(model, heads, ExitPolicy(True, EXITS, thresholds), PROMPT, 32)
    where = {r.exit_layer for r in result.records}
    assert where == {2, 4, 6}, result.usage()  # tokens left at every exit and at the end
    seq = PROMPT + result.token_ids[:-1]
    hs, full_cache = hidden_by_layer(model, seq, EXITS)
    for i, rec in enumerate(result.records):  # each token is what its head says on the exact hidden state
        assert expected_token(model, heads, hs, rec.exit_layer, len(PROMPT) - 1 + i) == rec.token, (i, rec)
    stack = result.extras["stepper"].stack
    lengths = stack.cache.lengths
    assert lengths[0] == len(seq) and min(lengths.values()) < len(seq)  # deep layers lag before catch-up
    stack.catch_up()
    assert set(stack.cache.lengths.values()) == {len(seq)} and not stack.waiting
    for layer in range(6):
        ours, full = stack.cache.layers[layer], full_cache.layers[layer]
        n = len(seq)
        assert (ours.k[:, :, :n] - full.k[:, :, :n]).abs().max() < 1e-4, layer
        assert (ours.v[:, :, :n] - full.v[:, :, :n]).abs().max() < 1e-4, layer


def test_standalone_with_a_shorter_edge_answers_at_its_last_layer(model):
    heads = noisy_heads(model, (2, 4))
    result = generate_standalone(model, heads, ExitPolicy.uniform((2,), 1.0), PROMPT, 8, end=4)
    assert result.usage() == {"edge@4": 8}
    assert set(result.extras["stepper"].stack.cache.layers) == {0, 1, 2, 3}  # nothing ran past the edge
    with pytest.raises(UsageError, match="exits off"):
        generate_standalone(model, heads, OFF, PROMPT, 4, end=4)
    with pytest.raises(UsageError, match="no exit head at layer"):
        generate_standalone(model, None, ExitPolicy.uniform((2,), 0.5), PROMPT, 4)


def test_policy_rejects_bad_settings():
    with pytest.raises(UsageError, match="criterion"):
        ExitPolicy(True, (2,), (0.5,), "entropy")
    with pytest.raises(UsageError, match="threshold"):
        ExitPolicy(True, (2, 4), (0.5,))
    with pytest.raises(UsageError, match=r"\[0, 1\]"):
        ExitPolicy.uniform((2,), 1.5)


def test_exit_heads_round_trip_and_refuse_the_wrong_model(model, tmp_path, llama_dir):
    heads = noisy_heads(model, EXITS)
    path = save_exit_heads(heads, tmp_path / "exits.json")
    loaded = load_exit_heads(tmp_path, model.config)
    assert loaded.layers == EXITS
    h = torch.randn(3, model.config.hidden_size)
    for e in EXITS:
        assert torch.equal(loaded.logits(e, h, model.head), heads.logits(e, h, model.head))
    four = load_model(llama_dir).config  # 4 layers
    with pytest.raises(ExitHeadError, match="num_layers"):
        load_exit_heads(path, four)
    weights = tmp_path / "exits.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ExitHeadError, match="sha256"):
        load_exit_heads(path, model.config)
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "layers": [9]}))
    with pytest.raises(UsageError, match="exit layers"):
        load_exit_heads(path, model.config)


def test_weight_decay_pulls_the_adapters_towards_identity_and_zero_is_plain_adam(model):
    from edge_node.exit_train import ExitTrainConfig, collect_hidden, train_exit_heads

    cache = collect_hidden(model, [PROMPT * 4, PROMPT[::-1] * 4], EXITS)

    def train(wd):
        return train_exit_heads(model, cache, ExitTrainConfig(EXITS, steps=20, batch=16, lr=1e-2, ridge=0.0,
                                                              weight_decay=wd))

    plain, again, decayed = train(0.0), train(0.0), train(20.0)
    for e in EXITS:
        a, b, d = (h.heads[str(e)] for h in (plain, again, decayed))
        assert torch.equal(a.adapter_w, b.adapter_w)  # deterministic for a seed
        assert float(d.adapter_w.norm()) < 0.9 * float(a.adapter_w.norm())  # A -> 0: the identity map
        assert float(d.norm.norm()) > 0.5 * float(a.norm.norm())  # the norms are not decayed (0.8^20 if they were)
    assert decayed.meta["trained"]["weight_decay"] == 20.0
    with pytest.raises(UsageError, match="weight_decay"):
        ExitTrainConfig(EXITS, weight_decay=-1.0)
