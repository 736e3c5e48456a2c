"""The per-token int8 recipe's two additions: the Hadamard rotation of every RMSNorm-fed linear's input
(exact in float; it spreads a token's massive channels) and GPTQ rounding of the int8 weights (same scales
and graph as plain rounding, smaller output error on correlated inputs)."""

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from npu_backends.dynamic import quantize_per_token, quantize_weight
from npu_backends.gptq import gptq_int8, input_moments
from npu_backends.prefill import ChunkedPrefill
from npu_backends.quantize import build_int8, head_matmuls, linear_roles, record_calibration
from npu_backends.rotate import ROTATE_SUFFIX, rotate_inputs
from tests.npu_backends.conftest import prompt_of


@pytest.fixture(scope="module")
def rotated_inputs(graphs, tmp_path_factory):
    spec = graphs[1][0]
    dst = tmp_path_factory.mktemp("rotate_in") / "rotated.onnx"
    names = rotate_inputs(spec.path, dst, block=64, exclude=head_matmuls(spec.path))  # the head stays as it is
    return spec, dataclasses.replace(spec, path=str(dst)), names


@pytest.mark.parametrize("length", [77, 5])
def test_input_rotation_is_exact_in_float(llama, rotated_inputs, length):
    spec, rot_spec, _ = rotated_inputs
    prompt = prompt_of(length, seed=80 + length)
    a, b = ChunkedPrefill(llama, [spec]).run(prompt), ChunkedPrefill(llama, [rot_spec]).run(prompt)
    assert np.abs(a.logits - b.logits).max() < 1e-4
    for i in range(4):
        assert np.abs(a.kv.v[i][:, :, :length] - b.kv.v[i][:, :, :length]).max() < 1e-4


def test_each_norm_gets_one_rotation_shared_by_its_linears(llama, rotated_inputs):
    spec, rot_spec, names = rotated_inputs
    assert len(names) == 2 * 4 and all(n.endswith(ROTATE_SUFFIX) for n in names)  # before q|k|v, before gate|up
    g = onnx.load(rot_spec.path, load_external_data=False).graph
    roles = linear_roles(spec.path)
    node = {n.name: n for n in g.node}
    for i in range(4):
        assert node[roles[f"{i}.gate"]].input[0] == node[roles[f"{i}.up"]].input[0]
        assert node[roles[f"{i}.gate"]].input[0].endswith("/rotated")
        assert node[roles[f"{i}.qkv"]].input[0].endswith("/rotated")
        assert not node[roles[f"{i}.o"]].input[0].endswith("/rotated")  # o reads attention, not a norm


def test_rotated_inputs_shrink_a_massive_channels_crest(tmp_path):
    # one token whose norm output is one huge channel (the attention-sink pattern): a per-token scale
    # spans it alone before the rotation; after it, the channel is spread over its 64-wide block
    from tests.npu_backends.test_dynamic import _one_linear

    rng = np.random.RandomState(3)
    n, k = 8, 128
    w = (rng.randn(k, 16) * 0.1).astype(np.float32)
    _one_linear(tmp_path / "f.onnx", n, k, w)
    m = onnx.load(tmp_path / "f.onnx")  # put a norm-like Mul by a 1-D gain in front of the linear
    lin = next(nd for nd in m.graph.node if nd.name == "lin")
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(k, np.float32), "gain"))
    m.graph.node.insert(0, onnx.helper.make_node("Mul", ["x", "gain"], ["xn"], name="norm"))
    lin.input[0] = "xn"
    onnx.save_model(m, tmp_path / "n.onnx")
    rotations = rotate_inputs(tmp_path / "n.onnx", tmp_path / "r.onnx")
    assert len(rotations) == 1
    x = rng.randn(1, n, k).astype(np.float32)
    x[0, 0, 7] = 300.0
    errs = {}
    for name in ("n", "r"):
        assert quantize_per_token(tmp_path / f"{name}.onnx", tmp_path / f"{name}.q.onnx", rotations) == ["lin"]
        sess = ort.InferenceSession(str(tmp_path / f"{name}.q.onnx"), providers=["CPUExecutionProvider"])
        got = sess.run(["y"], {"x": x, "cos": np.ones((n, 2), np.float32)})[0]
        ref = x @ w
        errs[name] = np.linalg.norm(got[0, 0] - ref[0, 0]) / np.linalg.norm(ref[0, 0] - x[0, 0, 7] * w[7])
    assert errs["r"] < errs["n"] / 4, errs  # the massive token's other channels survive the rotation


def test_gptq_keeps_the_scales_and_cuts_the_output_error_on_correlated_inputs():
    rng = np.random.RandomState(0)
    k, out, t = 96, 40, 600
    mix = rng.randn(k, k) * (rng.rand(k) ** 4)[None]  # anisotropic, correlated inputs
    x, x_test = (rng.randn(t, k) @ mix.T for _ in range(2))
    w = (rng.randn(k, out) * 0.05).astype(np.float32)
    q, s = gptq_int8(w, x.T @ x)
    q0, s0 = quantize_weight(w)
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127 and np.array_equal(s, s0)
    err = {name: np.linalg.norm(x_test @ (qq * s - w)) for name, qq in (("gptq", q), ("nearest", q0))}
    assert err["gptq"] < 0.6 * err["nearest"], err


def test_gptq_per_token_graph_is_the_plain_graph_with_other_integers(llama, graphs, tmp_path):
    spec = graphs[1][0]
    feeds = record_calibration(llama, [spec], [prompt_of(96, seed=500)])[0]
    moments = input_moments(spec.path, feeds)
    roles = linear_roles(spec.path)
    assert set(roles.values()) <= set(moments) and moments[roles["0.up"]].shape == (64, 64)
    assert np.array_equal(moments[roles["0.up"]], moments[roles["0.gate"]])  # one input, one moment
    plain = quantize_per_token(spec.path, tmp_path / "plain.onnx")
    tuned = quantize_per_token(spec.path, tmp_path / "gptq.onnx", moments=moments)
    assert plain == tuned
    a = onnx.load(tmp_path / "plain.onnx").graph
    b = onnx.load(tmp_path / "gptq.onnx").graph
    assert [n.op_type for n in a.node] == [n.op_type for n in b.node]
    ia = {i.name: onnx.numpy_helper.to_array(i) for i in a.initializer}
    ib = {i.name: onnx.numpy_helper.to_array(i) for i in b.initializer}
    w_names = [n for n in ia if n.endswith("/w_int8")]
    assert w_names and all(np.array_equal(ia[n.replace("w_int8", "w_scale")], ib[n.replace("w_int8", "w_scale")])
                           for n in w_names)
    assert any(not np.array_equal(ia[n], ib[n]) for n in w_names)


def test_token_graphs_rotate_every_linear_input_and_quantize_every_linear(llama, graphs, tmp_path):
    feeds = record_calibration(llama, graphs[1], [prompt_of(96, seed=600)])
    tuned = build_int8(graphs[1], feeds, tmp_path, "token")[0]
    plain = build_int8(graphs[1], feeds, tmp_path, "token", gptq=False)[0]
    assert tuned.path != plain.path and tuned.path.endswith("-gptq.onnx")
    g = onnx.load(tuned.path, load_external_data=False).graph
    assert sum(n.op_type == "MatMulInteger" for n in g.node) == 4 * 5
    rotations = [n for n in g.node if n.op_type == "MatMul" and n.name.endswith(ROTATE_SUFFIX)]
    assert len(rotations) == 4 * 3  # before q|k|v, before gate|up, before down
    assert next(n for n in g.node if n.output[0] == "logits").op_type == "MatMul"  # the head stays float
    prompt = prompt_of(70, seed=601)
    ref = ChunkedPrefill(llama, graphs[1]).run(prompt).logits
    for spec in (tuned, plain):
        got = ChunkedPrefill(llama, [spec]).run(prompt).logits
        assert np.abs(got - ref).max() < 0.5 and got.argmax() == ref.argmax()


def test_two_pass_activations_leave_only_the_weights_error(tmp_path):
    from tests.npu_backends.test_dynamic import _one_linear

    rng = np.random.RandomState(2)
    n, k, out = 8, 64, 24
    q = rng.randint(-127, 128, (k, out))
    q[0] = 127  # every column reaches 127: its int8 weights are exactly q, with no weight error at all
    w = (q * (rng.rand(out) * 0.01 + 0.001)).astype(np.float32)
    x = rng.randn(1, n, k).astype(np.float32)
    x[0, 0] *= 1000.0
    _one_linear(tmp_path / "f.onnx", n, k, w)
    errs = []
    for two in ((), ("lin",)):
        quantize_per_token(tmp_path / "f.onnx", tmp_path / "q.onnx", two_pass=two)
        sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
        got = sess.run(["y"], {"x": x, "cos": np.ones((n, 2), np.float32)})[0]
        errs.append((np.linalg.norm(got - x @ w, axis=-1) / np.linalg.norm(x @ w, axis=-1)).max())
    assert errs[0] > 1e-3 and errs[1] < errs[0] / 50, errs  # ~15 bits per token instead of 8
