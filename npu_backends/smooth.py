"""SmoothQuant-style smoothing of the chunk graphs, done on the exported float graph.

A few input channels of q|k|v and gate|up carry activations far larger than the rest,
and one per-tensor uint8 scale has to span them. Their weights are per-channel int8,
which has resolution to spare. So part of each channel's range moves from the
activation into the weight (Xiao et al., SmoothQuant):

    s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)
    (x * g) @ W  ==  (x * g / s) @ (diag(s) W)

where g is the preceding RMSNorm weight (a Mul by a 1-D initializer in the graph), so
the division costs nothing at run time and the rewrite is exact in float (up to
rounding). The same holds for down: silu(gate) * up is linear in up, so down's input
scale moves into up's weight columns. o has neither in front and is left alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .outliers import ChannelStats

FLOOR = 1e-5  # SmoothQuant's clamp: an all-zero channel or weight row gets a finite scale


def smoothing_scales(st: ChannelStats, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s (in,) for one activation feeding `weights` (each (in, out)); the MatMuls share s since they share x."""
    act = np.maximum(np.abs(st.lo), np.abs(st.hi)).astype(np.float64)
    w = np.max([np.abs(m).max(axis=1) for m in weights], axis=0).astype(np.float64)  # (in,) over every consumer
    s = np.maximum(act, FLOOR) ** alpha / np.maximum(w, FLOOR) ** (1 - alpha)
    return s.astype(np.float32)


class _Graph:
    """Producers, consumers and initializers of a graph; replaces initializers without editing shared ones."""

    def __init__(self, g: onnx.GraphProto):
        self.g = g
        self.inits = {i.name: i for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.made: set[str] = set()

    def weight(self, node, idx: int) -> np.ndarray:
        return numpy_helper.to_array(self.inits[node.input[idx]])

    def set_weight(self, node, idx: int, value: np.ndarray, tag: str) -> None:
        """Point node.input[idx] at a new initializer (or overwrite one this class made for that input)."""
        name = node.input[idx] if node.input[idx] in self.made else f"{node.name}/{tag}"
        t = numpy_helper.from_array(value, name)
        if name in self.inits:
            self.inits[name].CopyFrom(t)
        else:
            self.g.initializer.append(t)  # protobuf appends a copy: keep the one in the graph
            self.inits[name] = self.g.initializer[-1]
        self.made.add(name)
        node.input[idx] = name

    def only_user(self, tensor: str, node) -> bool:
        return [u.name for u in self.consumers.get(tensor, [])] == [node.name]

    def const_index(self, node, rank: int) -> int | None:
        """The input of `node` that is an initializer of the given rank, if exactly one is."""
        idx = [j for j, i in enumerate(node.input) if i in self.inits and len(self.inits[i].dims) == rank]
        return idx[0] if len(idx) == 1 else None


def _norm_groups(gr: _Graph, stats: dict[str, ChannelStats]):
    """(norm Mul, index of its weight input, [weight MatMuls it feeds]) for every smoothable norm.

    Smoothable: a Mul by a 1-D initializer whose output feeds only MatMuls we have stats for.
    """
    seen, groups = set(), []
    for node in gr.g.node:
        if node.name not in stats or node.input[0] in seen:
            continue
        x = node.input[0]
        mul = gr.producer.get(x)
        if mul is None or mul.op_type != "Mul" or (idx := gr.const_index(mul, 1)) is None:
            continue
        users = gr.consumers[x]
        if all(u.op_type == "MatMul" and u.name in stats for u in users):
            seen.add(x)
            groups.append((mul, idx, users))
    return groups


def _up_projection(gr: _Graph, down):
    """For down(silu(gate) * up): (up MatMul, its bias Add or None); None if the pattern is not there."""
    mul = gr.producer.get(down.input[0])
    if mul is None or mul.op_type != "Mul" or not gr.only_user(down.input[0], down):
        return None
    for side in mul.input:
        node, add = gr.producer.get(side), None
        if node is not None and node.op_type == "Add" and gr.const_index(node, 1) is not None:
            add, side = node, next(i for i in node.input if i not in gr.inits)
            node = gr.producer.get(side)
        ok = node is not None and node.op_type == "MatMul" and node.input[1] in gr.inits
        # Only used by this product (and its bias Add): scaling up's output changes nothing else.
        if ok and gr.only_user(side, add or mul) and (add is None or gr.only_user(add.output[0], mul)):
            return node, add
    return None


def smooth_graph(src: str | Path, dst: str | Path, stats: dict[str, ChannelStats],
                 alpha: float = 0.5) -> dict[str, ChannelStats]:
    """Write the smoothed graph to dst; return `stats` as the smoothed graph sees them (x / s).

    Two places take a smoothing scale for free: the RMSNorm weight before q|k|v and
    gate|up, and the up projection before down (silu(gate) * up is linear in up).
    """
    m = onnx.load(str(src))
    gr = _Graph(m.graph)
    out = dict(stats)
    for mul, idx, matmuls in _norm_groups(gr, stats):
        ws = [gr.weight(mm, 1) for mm in matmuls]  # each (in, out)
        s = smoothing_scales(stats[matmuls[0].name], ws, alpha)
        gain = gr.weight(mul, idx)
        gr.set_weight(mul, idx, (gain / s).astype(gain.dtype), "smooth_norm")
        for mm in matmuls:
            _scale_rows(gr, mm, s, out)
    for down in [n for n in gr.g.node if n.name in stats]:
        found = _up_projection(gr, down)
        if found is None:
            continue
        up, add = found
        s = smoothing_scales(stats[down.name], [gr.weight(down, 1)], alpha)
        w = gr.weight(up, 1)  # (in, inter): column j makes up's channel j
        gr.set_weight(up, 1, (w / s[None, :]).astype(w.dtype), "smooth_w")
        if add is not None:
            j = gr.const_index(add, 1)
            b = gr.weight(add, j)
            gr.set_weight(add, j, (b / s).astype(b.dtype), "smooth_b")
        _scale_rows(gr, down, s, out)
    _drop_unused(m.graph)
    onnx.save_model(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=Path(dst).name + ".data", size_threshold=1024)
    return out


def _scale_rows(gr: _Graph, mm, s: np.ndarray, stats: dict[str, ChannelStats]) -> None:
    """W (in, out) -> diag(s) W for a MatMul whose input was divided by s; its stats follow."""
    w = gr.weight(mm, 1)
    gr.set_weight(mm, 1, (w * s[:, None]).astype(w.dtype), "smooth_w")
    st = stats[mm.name]
    stats[mm.name] = dataclasses.replace(st, lo=st.lo / s, hi=st.hi / s)  # s > 0: lo stays below hi


def _drop_unused(g: onnx.GraphProto) -> None:
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
