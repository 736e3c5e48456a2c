"""W8A8 QDQ graphs (float head) and shadow outlier execution: exactness of the shadow rewrite, int8 agreement."""

import dataclasses

import numpy as np
import onnx
import pytest

from npu_backends.outliers import activation_stats, add_clip_and_shadow
from npu_backends.prefill import ChunkedPrefill
from npu_backends.quantize import build_int8, record_calibration
from npu_backends.rotate import ROTATE_SUFFIX
from tests.npu_backends.conftest import prompt_of


@pytest.fixture(scope="module")
def calibration(llama, graphs):
    prompts = [prompt_of(96, seed=100 + i) for i in range(3)]
    return record_calibration(llama, graphs[1], prompts)


def _agreement(llama, a_specs, b_specs, prompts):
    a, b = ChunkedPrefill(llama, a_specs), ChunkedPrefill(llama, b_specs)
    same, err = [], []
    for p in prompts:
        la, lb = a.run(p).logits, b.run(p).logits
        same.append(la.argmax() == lb.argmax())
        err.append(np.abs(la - lb).max())
    return float(np.mean(same)), float(np.max(err))


def _rewritten(spec, stats, tmp_path, fraction, shadow):
    dst = tmp_path / f"rewrite-{fraction}-{shadow}.onnx"
    add_clip_and_shadow(spec.path, dst, stats, fraction=fraction, shadow=shadow)
    return [dataclasses.replace(spec, path=str(dst))]


def test_shadow_adds_back_exactly_what_the_clip_cut_in_float(llama, graphs, calibration, tmp_path):
    # Before quantization: with every channel hot the whole input is "excess" and the shadow must
    # reproduce the layer exactly; with a few hot channels it must recover part of what the clip lost.
    spec = graphs[1][0]
    stats = activation_stats(spec.path, calibration[0])
    prompts = [prompt_of(50, seed=s) for s in range(3)]
    _, err_all = _agreement(llama, graphs[1], _rewritten(spec, stats, tmp_path, 1.0, True), prompts)
    assert err_all < 1e-4
    tight = {k: dataclasses.replace(s, lo=s.lo * 0.5, hi=s.hi * 0.5) for k, s in stats.items()}  # force excess
    _, err_clip = _agreement(llama, graphs[1], _rewritten(spec, tight, tmp_path, 1 / 8, False), prompts)
    _, err_shadow = _agreement(llama, graphs[1], _rewritten(spec, tight, tmp_path, 1 / 8, True), prompts)
    assert err_shadow < err_clip


@pytest.mark.parametrize("mode,layout", [("minmax", 1), ("shadow", 1), ("minmax", "plain")])
def test_quantized_graph_has_int8_linear_layers_and_float_attention_and_head(llama, graphs, calibration, tmp_path,
                                                                            mode, layout):
    feeds = calibration if layout == 1 else record_calibration(llama, graphs[layout], [prompt_of(96, seed=100)])
    spec = build_int8(graphs[layout], feeds, tmp_path, mode)[0]
    g = onnx.load(spec.path, load_external_data=False).graph
    dq_outputs = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
    matmuls = [n for n in g.node if n.op_type == "MatMul" and not n.name.endswith("/ShadowMatMul")]
    quantized = [n for n in matmuls if n.input[0] in dq_outputs and n.input[1] in dq_outputs]
    assert len(quantized) == 4 * 5  # qkv, o, gate, up, down per layer
    rotations = [n for n in matmuls if n.name.endswith(ROTATE_SUFFIX)]
    assert len(rotations) == 4 and not {n.name for n in rotations} & {n.name for n in quantized}  # float
    # the rotations, the head, and q.k and p.v per layer unless GroupQueryAttention fuses them
    assert len(matmuls) - len(quantized) == 4 + 1 + (0 if spec.fused else 2 * 4)
    head = next(n for n in g.node if n.output[0] == "logits")
    inits = {i.name for i in g.initializer}
    assert head.op_type == "MatMul" and head.input[1] in inits and head.input[0] not in dq_outputs
    assert not any(n.name.startswith(head.name + "/") for n in g.node)  # no clip or shadow on the head either
    attention = [n for n in g.node if n.op_type == ("GroupQueryAttention" if spec.fused else "Softmax")]
    assert len(attention) == 4 and not any(i in dq_outputs for n in attention for i in n.input)  # float


@pytest.mark.slow
def test_int8_top1_agreement_is_measured_and_bounded(llama, graphs, calibration, tmp_path):
    prompts = [prompt_of(n, seed=200 + n) for n in (20, 33, 47, 64, 80, 95, 110, 127)]
    for mode in ("minmax", "shadow"):
        specs = build_int8(graphs[1], calibration, tmp_path / mode, mode)
        same, err = _agreement(llama, graphs[1], specs, prompts)
        # A random tiny model has near-tied logits, so the bound is loose; the demo model's is in the README.
        assert same >= 0.75, (mode, same)
        assert err < 0.5, (mode, err)


def test_after_quantization_no_clip_is_left_on_the_int8_path(graphs, calibration, tmp_path):
    spec = build_int8(graphs[1], calibration, tmp_path, "shadow")[0]
    g = onnx.load(spec.path, load_external_data=False).graph
    clips = [n.name for n in g.node if n.op_type == "Clip"]
    assert clips and all(c.endswith("/ShadowClip") for c in clips)  # only the (.., k) shadow ones remain
