"""Per-device adapter rank and base quantization from memory and measured speed (FedPipe's idea, as a pure
function): a device gets the least lossy base that fits its memory, and a rank in proportion to its speed, so
weak devices train a smaller, cheaper adapter (HetLoRA aggregates the mixed ranks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edge_node.model.errors import UsageError
from quant.bnb import base_bytes

QUANT_ORDER = ("float32", "int8", "nf4")  # least lossy first
RANKS = (2, 4, 8, 16, 32)


@dataclass(frozen=True)
class DeviceProfile:
    memory_mb: float  # what training may use on the device
    s_per_step: float  # measured seconds per training step at the reference rank


@dataclass(frozen=True)
class ClientPlan:
    quant: str
    rank: int
    base_mb: float  # the base model's estimated resident size under `quant`


def choose_quant(memory_mb: float, params: int, overhead_mb: float) -> tuple[str, float]:
    """The least lossy base quantization whose weights plus `overhead_mb` (activations, the adapter and its
    optimizer state, the runtime) fit in `memory_mb`."""
    for quant in QUANT_ORDER:
        mb = base_bytes(params, quant) / 2**20
        if mb + overhead_mb <= memory_mb:
            return quant, mb
    need = base_bytes(params, QUANT_ORDER[-1]) / 2**20 + overhead_mb
    raise UsageError(f"{memory_mb:.0f} MB is not enough to train on a {params / 1e6:.1f}M-parameter base "
                     f"(nf4 needs about {need:.0f} MB)")


def choose_rank(s_per_step: float, fastest_s_per_step: float, max_rank: int, ranks: Sequence[int] = RANKS) -> int:
    """The largest allowed rank not above max_rank x (fastest speed / this device's speed)."""
    if s_per_step <= 0 or fastest_s_per_step <= 0:
        raise UsageError("seconds per step must be positive")
    budget = max_rank * min(1.0, fastest_s_per_step / s_per_step)
    fitting = [r for r in sorted(ranks) if r <= max(budget, min(ranks)) and r <= max_rank]
    return fitting[-1] if fitting else min(ranks)


def choose_plan(device: DeviceProfile, params: int, fastest_s_per_step: float, max_rank: int,
                overhead_mb: float = 256.0) -> ClientPlan:
    quant, mb = choose_quant(device.memory_mb, params, overhead_mb)
    return ClientPlan(quant, choose_rank(device.s_per_step, fastest_s_per_step, max_rank), round(mb, 1))
