"""The adapter on the wire: one flat array and its layout, back to the same named tensors; a layout that does
not fit the array is a named error (the server rejects that reply)."""

from __future__ import annotations

import pytest
import torch

from federated import wire


def adapter() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"l0.q.lora_A.weight": torch.randn(4, 16, generator=g),
            "l0.q.lora_B.weight": torch.randn(24, 4, generator=g),
            "l1.q.lora_A.weight": torch.randn(2, 16, generator=g)}


def test_an_adapter_travels_as_one_array_and_comes_back_equal_in_order():
    state = adapter()
    arrays, layout = wire.pack(state)
    assert list(arrays.keys()) == [wire.KEY] and arrays[wire.KEY].numpy().shape == (4 * 16 + 24 * 4 + 2 * 16,)
    back = wire.unpack(arrays, layout)
    assert list(back) == list(state) and all(torch.equal(back[n], state[n]) for n in state)


@pytest.mark.parametrize("change, message", [
    (lambda lay: {**lay, wire.SHAPES: lay[wire.SHAPES][:-1]}, "dimensions for 3 tensors"),
    (lambda lay: {**lay, wire.SHAPES: [5, *lay[wire.SHAPES][1:]]}, "hold 208 values, the array 192"),
    (lambda lay: {**lay, wire.NAMES: [lay[wire.NAMES][0]] * 3}, "names a tensor twice"),
    (lambda lay: {wire.NAMES: lay[wire.NAMES]}, "lacks the adapter layout"),
])
def test_a_layout_that_does_not_fit_is_a_named_error(change, message):
    arrays, layout = wire.pack(adapter())
    with pytest.raises(ValueError, match=message):
        wire.unpack(arrays, change(layout))


def test_only_2d_tensors_are_packed():
    with pytest.raises(ValueError, match="bias has shape"):
        wire.pack({"bias": torch.zeros(3)})
