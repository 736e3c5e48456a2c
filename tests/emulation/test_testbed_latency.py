"""The latency sweep: tensor-parallel ms/token under 0, 5, 10, 20 ms per link grows as the analytic model
says (2 allreduces per layer x the algorithm's hops x latency, plus 2 broadcasts, plus compute) within 20%,
for star and gloo allreduce. Plus the model's pure parts and the link's environment parsing."""

from __future__ import annotations

import random

import pytest

from edge_node.collectives import LinkEmulation, allreduce_hops
from edge_node.model.errors import UsageError
from edge_node.shard import write_shards
from emulation.latency import hops_per_token, predicted_ms, sweep, table
from tests.checkpoints import make_checkpoint

LAYERS = 2


def test_hops_of_each_algorithm():
    assert allreduce_hops("star", 2) == allreduce_hops("star", 8) == 2  # up to rank 0 and back
    assert [allreduce_hops("gloo", w) for w in (2, 3, 4)] == [2, 4, 6]  # ring: 2 (world - 1)
    assert allreduce_hops("star", 1) == 0
    assert hops_per_token(30, 2, "star") == 2 + 2 * 30 * 2
    assert predicted_ms(3.0, 2, 2, "star", 10) == 3.0 + 10 * 10


def test_link_from_environment():
    assert LinkEmulation.from_env({}) is None
    assert LinkEmulation.from_env({"EDGEFED_LINK_DELAY_MS": "0"}) is None
    link = LinkEmulation.from_env({"EDGEFED_LINK_DELAY_MS": "5", "EDGEFED_LINK_MBIT": "8"})
    assert link == LinkEmulation(delay_ms=5.0, mbit=8.0)
    assert link.hop_s(1000, random.Random(0)) == pytest.approx(0.005 + 1000 * 8 / 8e6)
    jittery = LinkEmulation(delay_ms=5, jitter_ms=2)
    hops = [jittery.hop_s(0, random.Random(i)) for i in range(200)]
    assert 0.003 <= min(hops) and max(hops) <= 0.007 and max(hops) - min(hops) > 0.003
    with pytest.raises(UsageError, match="EDGEFED_LINK_DELAY_MS='5ms': expected a number"):
        LinkEmulation.from_env({"EDGEFED_LINK_DELAY_MS": "5ms"})
    with pytest.raises(UsageError, match="EDGEFED_LINK_MBIT='0': must be above 0"):
        LinkEmulation.from_env({"EDGEFED_LINK_MBIT": "0"})
    with pytest.raises(UsageError, match="EDGEFED_LINK_LOSS_PCT='100': must be at least 0 and below 100"):
        LinkEmulation.from_env({"EDGEFED_LINK_LOSS_PCT": "100"})


def test_injected_loss_costs_a_retransmission_timeout_at_the_packet_rate():
    lossy = LinkEmulation.from_env({"EDGEFED_LINK_LOSS_PCT": "10"})
    rng = random.Random(0)
    small = [lossy.hop_s(100, rng) for _ in range(4000)]  # one packet: lost 10% of the time
    assert set(small) == {0.0, 0.2}
    assert 0.08 < small.count(0.2) / len(small) < 0.12
    big = [lossy.hop_s(10 * 1448, rng) for _ in range(4000)]  # ten packets: 1 - 0.9^10 = 65%
    assert 0.61 < big.count(0.2) / len(big) < 0.69


@pytest.mark.slow
def test_latency_sweep_matches_the_model_for_star_and_gloo(tmp_path):
    # eos out of reach of a random model's greedy path, so every run decodes all its tokens
    make_checkpoint(tmp_path / "m", num_hidden_layers=LAYERS, eos_token_id=255)
    write_shards(tmp_path / "m", tmp_path / "s", 2)
    rows = sweep(tmp_path / "s", LAYERS, 2, [0, 5, 10, 20], ["star", "gloo"], [5, 6, 7, 8], tokens=8)
    print("\n" + table(rows, LAYERS, 2))
    for r in rows:
        # 20% of the prediction, and 1.5 ms per hop of slack: each injected hop is a software relay's sleep and
        # wake-up, which a loaded 2-core machine delays by about a millisecond (CI once measured gloo at 5 ms
        # +14.5 ms over 10 hops: +26%). Forgetting the hops (predicting ms/token(0)) misses by 50 ms at 5 ms.
        slack = 0.20 * r.predicted_ms + 1.5 * hops_per_token(LAYERS, 2, r.mode)
        assert abs(r.measured_ms - r.predicted_ms) <= slack, table(rows, LAYERS, 2)
    for mode in ("star", "gloo"):
        ms = [r.measured_ms for r in rows if r.mode == mode]
        assert ms == sorted(ms) and ms[-1] > ms[0] + 100  # grows with latency: 10 hops x 20 ms on top
