"""The adapter on the wire: one flat float32 array (an ArrayRecord with the single key "adapter") and its layout
(tensor names and 2-D shapes, in a ConfigRecord beside it).

Flower stores and sends every array of a message as an object of its own, one HTTP request per object per hop
(ServerApp -> SuperLink -> SuperNode -> ClientApp and back), each retried with a backoff when it is not there
yet. A LoRA adapter on all 7 linears of a 30-layer model is 420 tensors; as one array it is one object. Flower's
client-side fixed clipping (fixedclipping_mod) clips the L2 norm of the whole update, so it treats one flat array
as it treats the tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord

KEY = "adapter"
NAMES = "adapter-names"
SHAPES = "adapter-shapes"  # rows, cols of each tensor in turn


def pack(state: Mapping[str, torch.Tensor]) -> tuple[ArrayRecord, dict]:
    """(the ArrayRecord to send, the layout to put in the message's ConfigRecord)."""
    shapes: list[int] = []
    for n, t in state.items():
        if t.dim() != 2:
            raise ValueError(f"adapter tensor {n} has shape {tuple(t.shape)}, expected 2-D (LoRA A or B)")
        shapes.extend(int(d) for d in t.shape)
    flat = torch.cat([t.detach().float().reshape(-1) for t in state.values()]) if state else torch.zeros(0)
    return ArrayRecord({KEY: flat.contiguous()}), {NAMES: list(state), SHAPES: shapes}


def unpack(arrays: ArrayRecord, layout: Mapping) -> dict[str, torch.Tensor]:
    """The named tensors of a packed adapter; ValueError naming what does not fit."""
    if list(arrays.keys()) != [KEY]:
        raise ValueError(f"expected one array {KEY!r}, got {list(arrays.keys())[:3]}")
    if NAMES not in layout or SHAPES not in layout:
        raise ValueError(f"the message lacks the adapter layout ({NAMES}, {SHAPES})")
    names, dims = list(layout[NAMES]), [int(d) for d in layout[SHAPES]]
    if len(dims) != 2 * len(names) or any(d < 0 for d in dims):
        raise ValueError(f"the layout gives {len(dims)} dimensions for {len(names)} tensors (2 each)")
    if len(set(names)) != len(names):
        raise ValueError("the layout names a tensor twice")
    flat = torch.from_numpy(np.asarray(arrays[KEY].numpy(), dtype=np.float32).reshape(-1).copy())
    sizes = [dims[2 * i] * dims[2 * i + 1] for i in range(len(names))]
    if sum(sizes) != flat.numel():
        raise ValueError(f"the layout's {len(names)} tensors hold {sum(sizes)} values, the array {flat.numel()}")
    out, at = {}, 0
    for i, (n, size) in enumerate(zip(names, sizes, strict=True)):
        out[n] = flat[at: at + size].view(dims[2 * i], dims[2 * i + 1])
        at += size
    return out
