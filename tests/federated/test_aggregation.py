"""Aggregation math: FedAvg over A and B, FFA-LoRA, HetLoRA mixed ranks, and rejection of bad updates."""

from __future__ import annotations

import logging

import pytest
import torch

from federated.aggregation import Update, aggregate, check_update, lora_rank, pad_to_rank, truncate

A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
A1 = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
B1 = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
SHAPES = {A0: (8, 16), B0: (12, 8), A1: (8, 20), B1: (16, 8)}  # rank 8


def state(seed: int, rank: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return truncate({n: torch.randn(s, generator=g) for n, s in SHAPES.items()}, rank)


def test_fedavg_averages_a_and_b_separately_by_weight():
    g, u1, u2 = state(0), state(1), state(2)
    new, s = aggregate("fedavg", g, [Update("a", u1, 1.0), Update("b", u2, 3.0)])
    assert not s.rejected
    for n in SHAPES:
        torch.testing.assert_close(new[n], 0.25 * u1[n] + 0.75 * u2[n])
    # the product of the averages is not the average of the products: why FFA-LoRA exists
    assert not torch.allclose(new[B0] @ new[A0], 0.25 * u1[B0] @ u1[A0] + 0.75 * u2[B0] @ u2[A0])


def test_ffa_lora_keeps_a_and_averages_the_update_exactly():
    g = state(0)
    b1, b2 = {n: t for n, t in state(1).items() if "lora_B" in n}, {n: t for n, t in state(2).items() if "lora_B" in n}
    new, s = aggregate("ffa", g, [Update("a", b1, 2.0), Update("b", b2, 2.0)])
    assert not s.rejected
    assert torch.equal(new[A0], g[A0]) and torch.equal(new[A1], g[A1])
    # with A shared, the averaged adapter's product is exactly the average of the clients' products
    torch.testing.assert_close(new[B0] @ new[A0], 0.5 * (b1[B0] @ g[A0] + b2[B0] @ g[A0]))


def test_ffa_lora_rejects_an_update_that_sends_a():
    g = state(0)
    _, s = aggregate("ffa", g, [Update("a", state(1), 1.0)])
    assert [r.client for r in s.rejected] == ["a"] and "unexpected tensor" in s.rejected[0].reason


def test_hetlora_pads_averages_and_truncates_mixed_ranks():
    g = state(0, rank=8)
    small, big = state(1, rank=2), state(2, rank=8)
    assert lora_rank(small) == 2
    new, s = aggregate("hetlora", g, [Update("s", small, 1.0, rank=2), Update("b", big, 1.0, rank=8)])
    assert not s.rejected
    # the first 2 rank components average both clients; the other 6 halve the big client's (the small one adds 0)
    torch.testing.assert_close(new[A0][:2], 0.5 * (small[A0] + big[A0][:2]))
    torch.testing.assert_close(new[A0][2:], 0.5 * big[A0][2:])
    torch.testing.assert_close(new[B1][:, 2:], 0.5 * big[B1][:, 2:])
    back = truncate(new, 2)
    assert back[A0].shape == (2, 16) and back[B0].shape == (12, 2)
    torch.testing.assert_close(pad_to_rank(B0, back[B0], 8)[:, :2], new[B0][:, :2])


def test_hetlora_rejects_a_rank_above_the_global_one():
    g = state(0, rank=4)
    _, s = aggregate("hetlora", g, [Update("x", state(1, rank=8), 1.0, rank=8)])
    assert "rank 8 is outside [1, 4]" in s.rejected[0].reason


@pytest.mark.parametrize("poison, reason", [
    (lambda u: u.pop(B1), "missing tensor"),
    (lambda u: u.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(8, 4)}), "unexpected tensor"),
    (lambda u: u.update({A0: torch.zeros(8, 17)}), "has shape [8, 17], expected [8, 16]"),
    (lambda u: u[B0].__setitem__((0, 0), float("nan")), "holds NaN or Inf"),
    (lambda u: u[A1].__setitem__((3, 3), float("inf")), "holds NaN or Inf"),
    (lambda u: u.update({A0: torch.zeros(8, 16, dtype=torch.int64)}), "not a float tensor"),
])
def test_a_poisoned_update_is_rejected_logged_and_never_averaged(poison, reason, caplog):
    g, good, bad = state(0), state(1), state(2)
    poison(bad)
    with caplog.at_level(logging.WARNING, logger="federated.aggregation"):
        new, s = aggregate("fedavg", g, [Update("good", good, 1.0), Update("evil", bad, 1000.0)])
    assert [r.client for r in s.rejected] == ["evil"] and reason in s.rejected[0].reason
    assert any("evil" in r.message and reason in r.message for r in caplog.records)
    for n in SHAPES:  # exactly the good client's tensors: nothing of the bad one leaked in
        torch.testing.assert_close(new[n], good[n])


def test_bad_weight_rejected_and_no_valid_update_keeps_the_global_adapter():
    g = state(0)
    assert "positive finite" in check_update(Update("z", state(1), 0.0), g, "fedavg")
    assert "positive finite" in check_update(Update("n", state(1), float("nan")), g, "fedavg")
    new, s = aggregate("fedavg", g, [Update("z", state(1), -1.0)])
    assert len(s.rejected) == 1 and all(torch.equal(new[n], g[n]) for n in g)


def test_staleness_lowers_a_late_updates_weight():
    g, fresh, late = state(0), state(1), state(2)
    new, _ = aggregate("fedavg", g, [Update("f", fresh, 1.0), Update("l", late, 1.0, staleness=3)],
                       staleness_decay=0.5)
    w_late = 0.5 / (1 + 0.5)  # (1 + 3)^-0.5 = 0.5 against 1
    torch.testing.assert_close(new[A0], (1 - w_late) * fresh[A0] + w_late * late[A0])
