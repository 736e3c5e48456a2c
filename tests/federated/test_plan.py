"""FedPipe-style per-device choice: least lossy base that fits memory, rank in proportion to speed."""

import pytest

from edge_node.model.errors import UsageError
from federated.plan import DeviceProfile, choose_plan, choose_quant, choose_rank

P135M = 135_000_000


def test_quantization_follows_memory():
    assert choose_quant(4096, P135M, 256)[0] == "float32"  # 515 MB of float32 weights fit
    assert choose_quant(500, P135M, 256)[0] == "int8"
    assert choose_quant(350, P135M, 256)[0] == "nf4"
    with pytest.raises(UsageError, match="not enough to train"):
        choose_quant(200, P135M, 256)


def test_rank_follows_speed():
    assert choose_rank(1.0, 1.0, 16) == 16
    assert choose_rank(4.0, 1.0, 16) == 4  # a 4x slower device trains a quarter of the rank
    assert choose_rank(3.0, 1.0, 16) == 4  # 5.3 rounds down to an allowed rank
    assert choose_rank(100.0, 1.0, 16) == 2  # never below the smallest rank
    assert choose_rank(0.5, 1.0, 8) == 8  # never above the session's rank


def test_plan_combines_both():
    plan = choose_plan(DeviceProfile(memory_mb=350, s_per_step=2.0), P135M, fastest_s_per_step=1.0, max_rank=8)
    assert (plan.quant, plan.rank) == ("nf4", 4) and 70 < plan.base_mb < 80
