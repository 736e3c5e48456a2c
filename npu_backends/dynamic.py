"""Per-token dynamic int8 activations for the linear layers (W8A8, activation scales computed at run time).

A static per-tensor activation scale is fixed on calibration text. A real pretrained model's linear inputs
carry a few tokens (the first, "attention-sink" token, delimiters) whose activations are tens to thousands
of times the rest's, so a scale wide enough for them leaves ordinary tokens a handful of levels, and a scale
that cuts them (clip) destroys exactly the tokens every later position attends to. Here each row of the
input gets its own scale, measured when the chunk runs:

    s_t = max_j |x_tj| / 127,   q_t = round(x_t / s_t) + 128 (uint8),   y_t = s_t * ((q_t - 128) @ Wq) * w_s

Wq, w_s: int8 weights with one scale per output channel, quantized offline. Every op is standard ONNX with
static shapes (Abs, ReduceMax, QuantizeLinear along the token axis, MatMulInteger, Cast, Mul), and one
quantization serves every linear that reads the same input (gate and up). Calibration is needed only by
the smoothing in front (smooth.py), not by the scales.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .gptq import gptq_int8

ZERO = 128  # uint8 zero point: symmetric int8 values stored as u8 (ORT's fast u8 x s8 GEMM)
TINY = 1e-12  # an all-zero row (padding) gets a finite scale


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W (in, out) float -> (int8 (in, out), scale (out,)): symmetric, one scale per output channel."""
    scale = np.maximum(np.abs(w).max(axis=0), TINY) / 127.0
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def quantize_per_token(src: str | Path, dst: str | Path, exclude: Sequence[str] = (),
                       moments: Mapping[str, np.ndarray] | None = None, two_pass: Sequence[str] = (),
                       two_level: Sequence[str] = (), fused: bool = False, fine: int = 0) -> list[str]:
    """Rewrite every weight MatMul of `src` not in `exclude` as a per-token dynamic W8A8 linear; write dst.

    moments: node name -> X^T X of its calibration inputs (gptq.input_moments); the weights of the linears
    it names are rounded by GPTQ's error feedback (same scales, same graph) instead of to the nearest level.
    two_pass: linears whose input is quantized twice, the second time its rounding residual (~15 bits per token
    in all), both passes in one u8 GEMM over 2N rows (twice that linear's GEMM work).
    two_level: linears whose weights get a second int8 level for their rounding residual (its own scale per
    output channel, ~15 bits in all), both levels in one GEMM over 2 x out columns (twice its GEMM work).
    fused: the column scales applied in the GEMM's output stage (ONNX Runtime's com.microsoft
    MatMulIntegerToFloat, same outputs) instead of MatMulInteger, Cast and Mul.
    fine: two_pass inputs done in one GEMM of the same rows instead: the rounding residual is put on a grid `fine`
    times finer than the token's step (|levels| <= fine / 2) and appended along the input axis, and the weights
    take rows round(Wq / fine) below their own (2 x in rows: twice the GEMM work, no extra output rows). The
    residual's product then carries ~4-bit weights and levels: ~5x less activation error rather than ~100x,
    for none of the stacked rows' output work (their row scales, split and add).
    Returns the names of the rewritten MatMuls.
    """
    m = onnx.load(str(src))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    tokens = _tokens(g)
    targets = [n for n in g.node if n.op_type == "MatMul" and n.input[1] in inits and n.name not in exclude]
    quantized: dict[tuple, tuple[str, str]] = {}  # (activation, two-pass, third block) -> (u8 rows, row scales)
    before: dict[str, list] = {}  # node name -> nodes to insert right before it
    replace: dict[str, list] = {}
    g.initializer.extend([numpy_helper.from_array(np.array(ZERO, np.uint8), "dyn/zero"),
                          numpy_helper.from_array(np.full(tokens, ZERO, np.uint8), "dyn/zero_rows"),
                          numpy_helper.from_array(np.array(1 / 127, np.float32), "dyn/inv127"),
                          numpy_helper.from_array(np.array(1.0, np.float32), "dyn/one"),
                          numpy_helper.from_array(np.array(1 / max(fine, 1), np.float32), "dyn/inv_fine"),
                          numpy_helper.from_array(np.array(max(fine, 1), np.float32), "dyn/fine"),
                          numpy_helper.from_array(np.array(TINY, np.float32), "dyn/tiny"),
                          numpy_helper.from_array(np.array([-1], np.int64), "dyn/flat"),
                          numpy_helper.from_array(np.array([tokens, tokens], np.int64), "dyn/halves")])
    for group in _gemm_groups(targets, two_pass, two_level, fine, fused):
        node = group[0]  # the group's quantization, GEMM and scales are named after its first linear
        # fine two-pass with two-level weights: a third block of input channels, no second set of output columns
        fine3 = bool(fine) and node.name in two_pass and node.name in two_level
        key = (node.input[0], node.name in two_pass, fine3)
        if key not in quantized:
            if key[1] and fine:
                nodes, quantized[key] = _quantize_rows_fine(node.name, key[0], fine, fine3)
            elif key[1]:
                nodes, quantized[key] = _quantize_rows_twice(node.name, key[0])
            else:
                nodes, quantized[key] = _quantize_rows(node.name, key[0])
            before[node.name] = nodes
        q, s = quantized[key]
        levels = node.name in two_level and not fine3  # a second set of output columns
        weights = [_weights(numpy_helper.to_array(inits[lin.input[1]]), moments.get(lin.name) if moments else None,
                            levels, fine if key[1] else 0, fine3) for lin in group]
        wq, ws = np.concatenate([w for w, _ in weights], axis=1), np.concatenate([c for _, c in weights])
        stacked = key[1] and not fine
        g.initializer.extend([numpy_helper.from_array(wq, f"{node.name}/w_int8"),
                              numpy_helper.from_array(ws, f"{node.name}/w_scale")])
        n = node.name
        replace[n] = _integer_gemm(n, q, fused) + [
            helper.make_node("Mul", [f"{n}/y_cols", s], [f"{n}/y_rows" if stacked else f"{n}/y_one"],
                             name=f"{n}/RowScale"),
        ]
        y = f"{n}/y_one"
        if stacked:  # (1, 2N, out): the two passes' rows summed
            replace[n] += [
                helper.make_node("Split", [f"{n}/y_rows", "dyn/halves"], [f"{n}/y_first", f"{n}/y_residual"],
                                 axis=1, name=f"{n}/SplitPasses"),
                helper.make_node("Add", [f"{n}/y_first", f"{n}/y_residual"], [y], name=f"{n}/AddPasses"),
            ]
        if levels:  # (1, N, 2 out): the two weight levels' columns summed
            replace[n] += [
                helper.make_node("Split", [y], [f"{n}/y_level1", f"{n}/y_level2"], axis=-1,
                                 name=f"{n}/SplitLevels"),
                helper.make_node("Add", [f"{n}/y_level1", f"{n}/y_level2"], [f"{n}/y_levels"], name=f"{n}/AddLevels"),
            ]
            y = f"{n}/y_levels"
        if len(group) > 1:  # (1, N, sum of outs): each linear's columns to its own output
            sizes = [w.shape[1] for w, _ in weights]
            g.initializer.append(numpy_helper.from_array(np.array(sizes, np.int64), f"{n}/group_split"))
            replace[n].append(helper.make_node("Split", [y, f"{n}/group_split"], [lin.output[0] for lin in group],
                                               axis=-1, name=f"{n}/SplitGroup"))
            for lin in group[1:]:
                replace[lin.name] = []
        else:
            replace[n][-1].output[0] = node.output[0]
    if fused and not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    nodes = []
    for n in g.node:  # topological order kept: each quantization right before its input's first linear
        nodes += before.get(n.name, []) + replace.get(n.name, [n])
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]  # the float weights of rewritten linears go
    del g.initializer[:]
    g.initializer.extend(keep)
    onnx.save_model(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=Path(dst).name + ".data", size_threshold=1024)
    return [n.name for n in targets]


def _gemm_groups(targets: list, two_pass: Sequence[str], two_level: Sequence[str], fine: int,
                 fused: bool) -> list[list]:
    """The linears to run as one GEMM each, in graph order: with fused scales, those that read the same input
    with the same options and have one level of output columns (gate and up) share one GEMM over their
    concatenated columns (one call, one row-scale Mul, one Split), each linear alone otherwise."""
    groups: dict[tuple, list] = {}
    for node in targets:
        stacked_levels = node.name in two_level and not (fine and node.name in two_pass)
        key = (node.input[0], node.name in two_pass, node.name in two_level)
        groups.setdefault(key if fused and not stacked_levels else (node.name,), []).append(node)
    return list(groups.values())


def _weights(w: np.ndarray, moments: np.ndarray | None, levels: bool, fine: int,
             fine3: bool) -> tuple[np.ndarray, np.ndarray]:
    """One linear's int8 weights (in-rows, out-columns) and column scales, as its GEMM takes them: GPTQ-rounded
    when `moments` (X^T X) are given; with `levels` a second int8 level for the rounding residual as more columns;
    with `fine` the levels round(Wq / fine) as more rows, and with fine3 the rounding residual on a grid `fine`
    times finer as a third block of rows."""
    wq, ws = gptq_int8(w, moments) if moments is not None else quantize_weight(w)
    if levels:  # (in, 2 out): the weights, then their rounding residual's levels
        rq, rs = quantize_weight(w - wq.astype(np.float32) * ws)
        wq, ws = np.concatenate([wq, rq], axis=1), np.concatenate([ws, rs])
    if fine:  # (2 in, out): below the weights, their levels on the residual's grid
        blocks = [wq, np.round(wq.astype(np.float32) / fine).astype(np.int8)]
        if fine3:  # (3 in, out): and the weights' own rounding residual on a grid `fine` times finer
            blocks.append(np.clip(np.round(fine * (w / ws - wq)), -127, 127).astype(np.int8))
        wq = np.concatenate(blocks, axis=0)
    return wq, ws


def _integer_gemm(n: str, q: str, fused: bool) -> list:
    """Nodes computing (q - 128) @ w_int8 * w_scale as float (1, rows, out): MatMulInteger, Cast, Mul, or
    fused, ONNX Runtime's MatMulIntegerToFloat (the column scales applied in the GEMM's output stage)."""
    if fused:
        return [helper.make_node("MatMulIntegerToFloat", [q, f"{n}/w_int8", "dyn/one", f"{n}/w_scale", "dyn/zero"],
                                 [f"{n}/y_cols"], domain="com.microsoft", name=f"{n}/MatMulIntegerToFloat")]
    return [
        helper.make_node("MatMulInteger", [q, f"{n}/w_int8", "dyn/zero"], [f"{n}/acc"], name=f"{n}/MatMulInteger"),
        helper.make_node("Cast", [f"{n}/acc"], [f"{n}/acc_f"], to=TensorProto.FLOAT, name=f"{n}/Cast"),
        helper.make_node("Mul", [f"{n}/acc_f", f"{n}/w_scale"], [f"{n}/y_cols"], name=f"{n}/ColScale"),
    ]


def _quantize_rows(name: str, x: str) -> tuple[list, tuple[str, str]]:
    """Nodes turning x (1, N, K) into uint8 rows and their scales (1, N, 1)."""
    t = {k: f"{name}/dyn_{k}" for k in ("abs", "amax", "amax_safe", "scale", "scale_rows", "u8")}
    nodes = [
        helper.make_node("Abs", [x], [t["abs"]], name=f"{name}/DynAbs"),
        helper.make_node("ReduceMax", [t["abs"]], [t["amax"]], axes=[-1], keepdims=1, name=f"{name}/DynMax"),
        helper.make_node("Max", [t["amax"], "dyn/tiny"], [t["amax_safe"]], name=f"{name}/DynSafe"),
        helper.make_node("Mul", [t["amax_safe"], "dyn/inv127"], [t["scale"]], name=f"{name}/DynScale"),  # (1, N, 1)
        helper.make_node("Reshape", [t["scale"], "dyn/flat"], [t["scale_rows"]], name=f"{name}/DynRows"),  # (N,)
        helper.make_node("QuantizeLinear", [x, t["scale_rows"], "dyn/zero_rows"], [t["u8"]], axis=1,
                         name=f"{name}/DynQuantize"),  # (1, N, K) uint8, one scale per token
    ]
    return nodes, (t["u8"], t["scale"])


def _rounding_residual(name: str, x: str, u8: str) -> tuple[list, str]:
    """Nodes computing x minus its per-token int8 levels `u8` (from _quantize_rows(name, x)), and that tensor."""
    deq, residual = f"{name}/dyn_deq", f"{name}/dyn_residual"
    return [helper.make_node("DequantizeLinear", [u8, f"{name}/dyn_scale_rows", "dyn/zero_rows"], [deq], axis=1,
                             name=f"{name}/DynDequantize"),
            helper.make_node("Sub", [x, deq], [residual], name=f"{name}/DynResidual")], residual


def _quantize_rows_twice(name: str, x: str) -> tuple[list, tuple[str, str]]:
    """Nodes turning x (1, N, K) into (1, 2N, K) uint8 rows: x's, then its rounding residual's, and their
    scales (1, 2N, 1)."""
    first, (u1, s1) = _quantize_rows(name, x)
    t = {k: f"{name}/dyn2_{k}" for k in ("u8", "scale")}
    rounding, residual = _rounding_residual(name, x, u1)
    nodes = first + rounding
    second, (u2, s2) = _quantize_rows(f"{name}/residual", residual)
    nodes += second + [
        helper.make_node("Concat", [u1, u2], [t["u8"]], axis=1, name=f"{name}/DynPasses"),
        helper.make_node("Concat", [s1, s2], [t["scale"]], axis=1, name=f"{name}/DynPassScales"),
    ]
    return nodes, (t["u8"], t["scale"])


def _quantize_rows_fine(name: str, x: str, fine: int, coarse: bool = False) -> tuple[list, tuple[str, str]]:
    """Nodes turning x (1, N, K) into (1, N, 2K) uint8: x's levels, then its rounding residual on a grid `fine`
    times finer (levels within +-fine/2), and the rows' scales (1, N, 1) of the first. coarse: (1, N, 3K), x
    again on a grid `fine` times coarser (levels within +-127/fine), to meet the weights' rounding residual."""
    first, (u1, s1) = _quantize_rows(name, x)
    t = {k: f"{name}/dynf_{k}" for k in ("fine_rows", "u8r", "u8")}
    rounding, residual = _rounding_residual(name, x, u1)
    nodes = first + rounding + [
        helper.make_node("Mul", [f"{name}/dyn_scale_rows", "dyn/inv_fine"], [t["fine_rows"]], name=f"{name}/FineStep"),
        helper.make_node("QuantizeLinear", [residual, t["fine_rows"], "dyn/zero_rows"], [t["u8r"]], axis=1,
                         name=f"{name}/FineQuantize"),
    ]
    blocks = [u1, t["u8r"]]
    if coarse:
        nodes += [
            helper.make_node("Mul", [f"{name}/dyn_scale_rows", "dyn/fine"], [f"{name}/dynf_coarse_rows"],
                             name=f"{name}/CoarseStep"),
            helper.make_node("QuantizeLinear", [x, f"{name}/dynf_coarse_rows", "dyn/zero_rows"], [f"{name}/dynf_u8c"],
                             axis=1, name=f"{name}/CoarseQuantize"),
        ]
        blocks.append(f"{name}/dynf_u8c")
    nodes.append(helper.make_node("Concat", blocks, [t["u8"]], axis=-1, name=f"{name}/FineJoin"))
    return nodes, (t["u8"], s1)


def _tokens(g: onnx.GraphProto) -> int:
    """N, the chunk's rows: the first dimension of the graph's `cos` input (N, D)."""
    for vi in g.input:
        if vi.name == "cos":
            return vi.type.tensor_type.shape.dim[0].dim_value
    raise ValueError("the graph has no `cos` input (N, D): not an exported chunk graph")


BLOCK = 32  # weights and activations quantized in blocks of this many input channels


def quantize_blockwise(src: str | Path, dst: str | Path, exclude: Sequence[str] = (), block: int = BLOCK,
                       accuracy_level: int = 4) -> list[str]:
    """Rewrite every weight MatMul of `src` not in `exclude` as ONNX Runtime's MatMulNBits with 8-bit weights
    (one scale per `block` input channels of each output) and accuracy_level 4: the CPU EP quantizes the
    activations to int8 as it runs, one scale per token and block, and multiplies in int8 (VNNI); write dst.

    Returns the names of the rewritten MatMuls. A com.microsoft op: the CPU EP's recipe, not an NPU graph.
    """
    m = onnx.load(str(src))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    targets = [n for n in g.node if n.op_type == "MatMul" and n.input[1] in inits and n.name not in exclude]
    replace = {}
    for node in targets:
        w = numpy_helper.to_array(inits[node.input[1]])  # (K, out)
        q, scale = block_weight(w, block)
        n = node.name
        g.initializer.extend([numpy_helper.from_array(q, f"{n}/w_blocks"),
                              numpy_helper.from_array(scale, f"{n}/w_scales")])
        replace[n] = helper.make_node("MatMulNBits", [node.input[0], f"{n}/w_blocks", f"{n}/w_scales"],
                                      [node.output[0]], name=n, domain="com.microsoft", K=w.shape[0],
                                      N=w.shape[1], bits=8, block_size=block, accuracy_level=accuracy_level)
    nodes = [replace.get(n.name, n) for n in g.node]
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    onnx.save_model(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=Path(dst).name + ".data", size_threshold=1024)
    return [n.name for n in targets]


def block_weight(w: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """W (K, out) -> MatMulNBits' 8-bit layout: uint8 (out, K/block, block) stored with zero point 128, and
    scales (out, K/block); symmetric, K zero-padded up to whole blocks."""
    k, out = w.shape
    pad = -k % block
    wt = np.concatenate([w, np.zeros((pad, out), w.dtype)]).T.reshape(out, -1, block)  # (out, blocks, block)
    scale = np.maximum(np.abs(wt).max(-1), TINY) / 127.0
    q = np.clip(np.round(wt / scale[..., None]), -127, 127).astype(np.int32) + ZERO
    return q.astype(np.uint8), scale.astype(np.float32)
