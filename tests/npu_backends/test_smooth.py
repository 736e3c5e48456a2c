"""SmoothQuant-style smoothing of the float chunk graphs: exact in float, and it flattens the activation ranges."""

import dataclasses

import numpy as np
import onnx
import pytest

from npu_backends.outliers import activation_stats
from npu_backends.prefill import ChunkedPrefill
from npu_backends.quantize import head_matmuls, record_calibration
from npu_backends.smooth import smooth_graph
from tests.npu_backends.conftest import prompt_of


@pytest.fixture(scope="module")
def smoothed(llama, graphs, tmp_path_factory):
    spec = graphs[1][0]
    feeds = record_calibration(llama, [spec], [prompt_of(96, seed=300 + i) for i in range(3)])[0]
    head = head_matmuls(spec.path)
    stats = {k: v for k, v in activation_stats(spec.path, feeds).items() if k not in head}
    dst = tmp_path_factory.mktemp("smooth") / "smoothed.onnx"
    predicted = smooth_graph(spec.path, dst, stats, alpha=0.5)
    return spec, dataclasses.replace(spec, path=str(dst)), stats, predicted, feeds


@pytest.mark.parametrize("length", [77, 5])
def test_smoothing_is_exact_in_float(llama, smoothed, length):
    spec, smooth_spec, *_ = smoothed
    prompt = prompt_of(length, seed=40 + length)
    a, b = ChunkedPrefill(llama, [spec]).run(prompt), ChunkedPrefill(llama, [smooth_spec]).run(prompt)
    assert np.abs(a.logits - b.logits).max() < 1e-4
    for i in range(4):
        assert np.abs(a.kv.k[i][:, :, :length] - b.kv.k[i][:, :, :length]).max() < 1e-4
        assert np.abs(a.kv.v[i][:, :, :length] - b.kv.v[i][:, :, :length]).max() < 1e-4


def test_every_normed_linear_and_down_is_smoothed_and_the_stats_follow(smoothed):
    _, smooth_spec, stats, predicted, feeds = smoothed
    g = onnx.load(smooth_spec.path, load_external_data=False).graph
    names = [i.name for i in g.initializer]
    # per layer: q|k|v and gate, up (rows, from the norms), down (rows, from up's columns); 2 norm weights
    assert sum(n.endswith("/smooth_w") for n in names) == 4 * 4
    assert sum(n.endswith("/smooth_norm") for n in names) == 4 * 2
    measured = activation_stats(smooth_spec.path, feeds)  # the smoothed graph's real linear inputs
    changed = 0
    for node, st in predicted.items():
        assert np.allclose(measured[node].hi, st.hi, rtol=1e-3, atol=1e-5)
        assert np.allclose(measured[node].lo, st.lo, rtol=1e-3, atol=1e-5)
        old = np.maximum(np.abs(stats[node].lo), np.abs(stats[node].hi))
        new = np.maximum(np.abs(st.lo), np.abs(st.hi))
        if not np.allclose(old, new):
            changed += 1
            # alpha 0.5 takes the square root of the activation spread across channels (weights' spread aside)
            assert new.max() / np.median(new) < old.max() / np.median(old)
    assert changed == 4 * 4
