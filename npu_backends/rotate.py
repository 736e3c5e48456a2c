"""Block-Hadamard rotation of the down projection's input (after QuaRot), done on the float graph.

silu(gate) * up is heavy-tailed token by token: a few entries per row are tens of times
the row's spread, so one static per-tensor uint8 scale leaves the bulk a handful of
levels. Smoothing (smooth.py) only moves ranges between channels; a rotation mixes
channels, so one large entry becomes many small ones. With R = blockdiag(H, ..., H),
H the b x b Hadamard matrix / sqrt(b) (orthogonal and symmetric):

    x @ W  ==  (x R) @ (R^T W)

R^T W is folded into the weight offline; x R is one small float MatMul at run time,
(.., I/b, b) @ (b, b), about b / hidden of the down projection's work (mllm's CPU part).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .smooth import _drop_unused, _Graph, _up_projection

ROTATE_SUFFIX = "/Rotate"  # the float MatMul inserted before each rotated down projection


def hadamard(b: int) -> np.ndarray:
    """(b, b) orthonormal Sylvester Hadamard matrix; b a power of two."""
    if b < 1 or b & (b - 1):
        raise ValueError(f"Hadamard size {b} is not a power of two")
    h = np.ones((1, 1))
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(b)).astype(np.float32)


def block_size(channels: int, largest: int) -> int:
    """The largest power of two <= `largest` dividing `channels` (1 if none)."""
    b = 1
    while b * 2 <= largest and channels % (b * 2) == 0:
        b *= 2
    return b


def rotate_down(src: str | Path, dst: str | Path, block: int = 64, minimum: int = 16) -> list[str]:
    """Rotate every down projection's input by blockdiag(H); return the inserted (float) MatMul names.

    A down projection whose width has no power-of-two factor >= `minimum` is left as it is.
    """
    m = onnx.load(str(src))
    gr = _Graph(m.graph)
    downs = [n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in gr.inits
             and _up_projection(gr, n) is not None]
    inserted, before = [], {}
    for down in downs:
        w = gr.weight(down, 1)  # (I, out)
        b = block_size(w.shape[0], block)
        if b < minimum:
            continue
        h = hadamard(b)
        blocks = w.reshape(w.shape[0] // b, b, -1)  # (I/b, b, out)
        gr.set_weight(down, 1, np.einsum("ij,kjo->kio", h.T, blocks).reshape(w.shape).astype(w.dtype), "rot_w")
        before[down.name] = _rotation_nodes(m.graph, down, h)
        inserted.append(down.name + ROTATE_SUFFIX)
    nodes = []
    for n in m.graph.node:  # keep topological order: each rotation right before its down projection
        nodes += before.get(n.name, []) + [n]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    _drop_unused(m.graph)  # the unrotated weights
    onnx.save_model(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=Path(dst).name + ".data", size_threshold=1024)
    return inserted


def _rotation_nodes(g: onnx.GraphProto, down, h: np.ndarray) -> list:
    name, x, b = down.name, down.input[0], h.shape[0]
    g.initializer.extend([
        numpy_helper.from_array(h, f"{name}/hadamard"),
        numpy_helper.from_array(np.array([0, 0, -1, b], np.int64), f"{name}/blocks_shape"),
        numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"{name}/flat_shape"),
    ])
    down.input[0] = f"{name}/rotated"
    return [
        helper.make_node("Reshape", [x, f"{name}/blocks_shape"], [f"{name}/blocks"], name=f"{name}/RotateSplit"),
        # (1, N, I/b, b) @ (b, b): each block of b channels mixed by H
        helper.make_node("MatMul", [f"{name}/blocks", f"{name}/hadamard"], [f"{name}/mixed"],
                         name=name + ROTATE_SUFFIX),
        helper.make_node("Reshape", [f"{name}/mixed", f"{name}/flat_shape"], [f"{name}/rotated"],
                         name=f"{name}/RotateJoin"),  # back to (1, N, I)
    ]


def _norm_outputs(gr: _Graph) -> list[tuple[str, list]]:
    """(tensor, [weight MatMuls reading it]) for every RMSNorm output (a Mul by a 1-D initializer, the gain)
    read only by weight MatMuls: q|k|v and gate, up."""
    found = []
    for n in gr.g.node:
        if n.op_type != "Mul" or gr.const_index(n, 1) is None:
            continue
        users = gr.consumers.get(n.output[0], [])
        if users and all(u.op_type == "MatMul" and u.input[0] == n.output[0] and u.input[1] in gr.inits
                         for u in users):
            found.append((n.output[0], users))
    return found


def rotate_inputs(src: str | Path, dst: str | Path, block: int = 64, minimum: int = 16,
                  exclude: Sequence[str] = ()) -> list[str]:
    """Rotate the input of every linear fed by an RMSNorm (q|k|v, gate and up) by blockdiag(H): one float
    rotation per norm output, shared by the linears reading it; their weights take R^T. Returns the inserted
    (float) MatMul names. After the norm, a token's few massive channels (the attention sink's, the
    delimiters') are spread over their block, so a per-token int8 scale no longer spans them alone.
    """
    m = onnx.load(str(src))
    gr = _Graph(m.graph)
    inserted, after = [], {}
    for x, users in _norm_outputs(gr):
        if any(u.name in exclude for u in users):
            continue
        k = gr.weight(users[0], 1).shape[0]
        b = block_size(k, block)
        if b < minimum:
            continue
        h = hadamard(b)
        for u in users:
            w = gr.weight(u, 1)
            blocks = w.reshape(k // b, b, -1)
            gr.set_weight(u, 1, np.einsum("ij,kjo->kio", h.T, blocks).reshape(w.shape).astype(w.dtype), "rot_w")
        name = users[0].name + "/in"
        nodes = _rotation_nodes(m.graph, _Input(name, x), h)
        for u in users:
            u.input[0] = f"{name}/rotated"
        after[gr.producer[x].name] = nodes
        inserted.append(name + ROTATE_SUFFIX)
    nodes = []
    for n in m.graph.node:  # each rotation right after the norm that makes its input
        nodes += [n] + after.get(n.name, [])
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    _drop_unused(m.graph)
    onnx.save_model(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=Path(dst).name + ".data", size_threshold=1024)
    return inserted


class _Input:
    """The fields of a node _rotation_nodes reads: a name for the new tensors and the input it rotates."""

    def __init__(self, name: str, x: str):
        self.name, self.input = name, [x]

