"""A decode step stays cheap to dispatch: on CPU a one-token step of a small model costs more in per-op overhead
than in arithmetic, so the number of tensor ops per layer is a budget (57 before the step was trimmed, 38 now)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from edge_node.model import load_model
from tests.checkpoints import make_checkpoint


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] = self.ops.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("pack", [False, True], ids=["plain", "onednn-packed"])
def test_a_decode_step_dispatches_at_most_40_ops_per_layer(tmp_path, pack):
    make_checkpoint(tmp_path / "m", tie=True)
    model = load_model(tmp_path / "m", pack=pack)
    cache = model.new_cache()
    with torch.inference_mode():
        model(torch.tensor([[5, 6, 7]]), cache, 0)
        with OpCounter() as counter:
            model(torch.tensor([[8]]), cache, 3, last_only=True)
    layers = model.config.num_layers
    total = sum(counter.ops.values())
    assert total <= 40 * layers + 10, f"{total} ops for {layers} layers: {sorted(counter.ops.items())}"
    assert counter.ops.get("aten.arange.default", 0) == 0  # decode builds no mask
