"""Calibrated clip ranges and shadow outlier execution (after mllm-NPU).

A few input channels of a linear layer carry activations far larger than the rest.
A per-tensor int8 scale wide enough for them wastes resolution on everything else.
So the int8 path quantizes the input clipped to the range of the ordinary channels,
and a small float "shadow" computes what the clip cut off:

    y = int8(clip(x, lo, hi)) @ W  +  (x[:, K] - clip(x[:, K], lo, hi)) @ W[K, :]

K is a static set of hot channels found on calibration text (static so the graph
stays NPU-compilable); the shadow MatMul is left float, meant for the CPU. Excess in
channels outside K is dropped; `excess_coverage` measures how much that is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper


@dataclass(frozen=True)
class ChannelStats:
    """Per input channel of one linear layer, over calibration tokens."""

    lo: np.ndarray  # (in,) minimum
    hi: np.ndarray  # (in,) maximum

    def hot(self, k: int) -> np.ndarray:
        """The k channels of largest magnitude, ascending (Gather indices)."""
        mag = np.maximum(np.abs(self.lo), np.abs(self.hi))
        return np.sort(np.argsort(-mag, kind="stable")[:k])

    def clip_range(self, hot: np.ndarray) -> tuple[float, float]:
        """Per-tensor range of the ordinary (non-hot) channels; (0, 0) if every channel is hot."""
        keep = np.ones(self.lo.shape[0], bool)
        keep[hot] = False
        if not keep.any():
            return 0.0, 0.0
        return float(min(self.lo[keep].min(), 0.0)), float(max(self.hi[keep].max(), 0.0))


def linear_inputs(graph: onnx.GraphProto) -> dict[str, tuple[str, str]]:
    """MatMul node name -> (activation input, weight initializer) for every weight MatMul."""
    inits = {i.name for i in graph.initializer}
    return {n.name: (n.input[0], n.input[1]) for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits}


def linear_input_probe(path: str | Path, names=None) -> tuple[ort.InferenceSession, list[str], dict]:
    """A session of the float graph at `path` with the activation input of every weight MatMul (or of the named
    ones) exposed as an output: (session, those outputs sorted, MatMul name -> (input, weight))."""
    path = Path(path)
    m = onnx.load(str(path), load_external_data=False)  # weights stay in the .data file beside it
    targets = {k: v for k, v in linear_inputs(m.graph).items() if names is None or k in names}
    outputs = sorted({x for x, _ in targets.values()})
    m.graph.output.extend(helper.make_empty_tensor_value_info(x) for x in outputs)
    probe = path.with_name(path.stem + ".probe.onnx")  # beside the original: its weights resolve
    onnx.save_model(m, str(probe))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the tensors we name
    try:
        sess = ort.InferenceSession(str(probe), so, providers=["CPUExecutionProvider"])
    finally:
        probe.unlink()
    return sess, outputs, targets


def activation_stats(path: str | Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, ChannelStats]:
    """Run the float graph on recorded feeds with every linear input exposed as an output."""
    sess, outputs, targets = linear_input_probe(path)
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, arr in zip(outputs, sess.run(outputs, feed), strict=True):
            flat = arr.reshape(-1, arr.shape[-1])  # (tokens, in)
            lo[name] = np.minimum(lo.get(name, flat.min(0)), flat.min(0))
            hi[name] = np.maximum(hi.get(name, flat.max(0)), flat.max(0))
    return {node: ChannelStats(lo[x], hi[x]) for node, (x, _) in targets.items()}


def hot_count(channels: int, fraction: float) -> int:
    return max(1, math.ceil(channels * fraction))


def add_clip_and_shadow(src: str | Path, dst: str | Path, stats: dict[str, ChannelStats],
                        fraction: float = 1 / 64, shadow: bool = True) -> list[str]:
    """Rewrite each linear layer as clip -> MatMul (+ float shadow over hot channels); return shadow node names.

    With shadow=False only the clip is inserted: the int8 graph at the same tight range, for comparison.
    """
    m = onnx.load(str(src))
    g = m.graph
    weights = {i.name: i for i in g.initializer}
    shadow_nodes: list[str] = []
    new_nodes = []
    for node in g.node:
        if node.name not in stats or node.op_type != "MatMul":
            new_nodes.append(node)
            continue
        new_nodes += _rewrite(node, stats[node.name], weights[node.input[1]], fraction, shadow, g, shadow_nodes)
    del g.node[:]
    g.node.extend(new_nodes)
    onnx.save_model(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=Path(dst).name + ".data", size_threshold=1024)
    return shadow_nodes


def _rewrite(node, st: ChannelStats, w_init, fraction: float, shadow: bool, g, shadow_nodes: list[str]):
    x, w = node.input[0], node.input[1]
    y, name = node.output[0], node.name
    hot = st.hot(hot_count(st.lo.shape[0], fraction))
    lo, hi = st.clip_range(hot)
    bounds = [f"{name}/clip_lo", f"{name}/clip_hi"]
    g.initializer.extend([numpy_helper.from_array(np.array(lo, np.float32), bounds[0]),
                          numpy_helper.from_array(np.array(hi, np.float32), bounds[1])])
    # The main-path Clip gives the calibrator the tight range; after quantization it is redundant
    # (QuantizeLinear saturates at the same range) and strip_main_clips removes it.
    xc = f"{name}/clipped"
    nodes = [helper.make_node("Clip", [x, *bounds], [xc], name=f"{name}/Clip")]
    main_out = f"{name}/main" if shadow else y
    nodes.append(helper.make_node("MatMul", [xc, w], [main_out], name=name))
    if not shadow:
        return nodes
    wk = numpy_helper.to_array(w_init)[hot]  # (k, out): the hot rows of W (in, out)
    g.initializer.extend([numpy_helper.from_array(wk, f"{name}/shadow_w"),
                          numpy_helper.from_array(hot.astype(np.int64), f"{name}/hot")])
    xk, xkc, ek, sh = (f"{name}/{t}" for t in ("hot_x", "hot_clipped", "excess", "shadow"))
    # Gather first, so the shadow's element-wise work is (.., k), not (.., in).
    nodes += [
        helper.make_node("Gather", [x, f"{name}/hot"], [xk], axis=-1, name=f"{name}/ShadowGather"),  # (.., k)
        helper.make_node("Clip", [xk, *bounds], [xkc], name=f"{name}/ShadowClip"),
        helper.make_node("Sub", [xk, xkc], [ek], name=f"{name}/ShadowSub"),
        helper.make_node("MatMul", [ek, f"{name}/shadow_w"], [sh], name=f"{name}/ShadowMatMul"),
        helper.make_node("Add", [main_out, sh], [y], name=f"{name}/ShadowAdd"),
    ]
    shadow_nodes.append(f"{name}/ShadowMatMul")
    return nodes


def strip_main_clips(path: str | Path) -> int:
    """Drop each main-path Clip that feeds only QuantizeLinear nodes (they saturate at its range)."""
    m = onnx.load(str(path), load_external_data=False)  # rewrite the graph; the weights file is untouched
    g = m.graph
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    drop = [n for n in g.node if n.op_type == "Clip" and n.name.endswith("/Clip")
            and all(c.op_type == "QuantizeLinear" for c in consumers.get(n.output[0], []))]
    for clip in drop:
        for q in consumers[clip.output[0]]:
            q.input[0] = clip.input[0]
        g.node.remove(clip)
    onnx.save_model(m, str(path))
    return len(drop)


def excess_coverage(stats: dict[str, ChannelStats], heldout: dict[str, ChannelStats],
                    fraction: float = 1 / 64) -> float:
    """Share of held-out channels that leave the calibrated clip range and are in the hot set (1.0 = all)."""
    leave = covered = 0
    for node, st in stats.items():
        hot = set(st.hot(hot_count(st.lo.shape[0], fraction)).tolist())
        lo, hi = st.clip_range(np.array(sorted(hot)))
        h = heldout[node]
        out = np.nonzero((h.lo < lo) | (h.hi > hi))[0]
        leave += len(out)
        covered += sum(1 for c in out if c in hot)
    return covered / leave if leave else 1.0
