"""token2: the per-token recipe with more bits where they pay (issue 16): two-level int8 weights (the rounding
residual gets its own int8 level, one GEMM over 2 x out columns), two-pass activations, and the column scales
fused into the GEMM (MatMulIntegerToFloat) with the same outputs as MatMulInteger, Cast, Mul."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge_node.model.errors import UsageError
from npu_backends.dynamic import quantize_per_token
from npu_backends.prefill import ChunkedPrefill
from npu_backends.quantize import TOKEN2_TWO_LEVEL, TOKEN2_TWO_PASS, build_int8, linear_roles, record_calibration
from tests.npu_backends.conftest import prompt_of
from tests.npu_backends.test_dynamic import _one_linear


def _run(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x, "cos": np.ones((x.shape[1], 2), np.float32)})[0]


def _relative(got: np.ndarray, ref: np.ndarray) -> float:
    return float((np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)).max())


def test_two_level_weights_remove_the_weights_rounding_error(tmp_path):
    rng = np.random.RandomState(4)
    n, k, out = 8, 64, 24
    # every row holds integers up to +-127 times its own scale: per-token int8 represents it exactly, so
    # whatever error is left is the weights'
    levels = rng.randint(-126, 127, (1, n, k))
    levels[0, :, 0] = 127  # each row's largest entry sets its scale: 127 levels exactly
    x = (levels * (rng.rand(1, n, 1) + 0.1)).astype(np.float32)
    w = (rng.randn(k, out) * 0.05).astype(np.float32)
    _one_linear(tmp_path / "f.onnx", n, k, w)
    errs = []
    for two in ((), ("lin",)):
        quantize_per_token(tmp_path / "f.onnx", tmp_path / "q.onnx", two_level=two)
        errs.append(_relative(_run(tmp_path / "q.onnx", x), x @ w))
    assert errs[0] > 1e-3 and errs[1] < errs[0] / 50, errs  # ~15 bits per weight instead of 8
    g = onnx.load(tmp_path / "q.onnx").graph
    w_int8 = next(i for i in g.initializer if i.name == "lin/w_int8")
    assert list(w_int8.dims) == [k, 2 * out]  # one GEMM over both levels' columns


@pytest.mark.parametrize("options", [{}, {"two_pass": ["lin"]}, {"two_level": ["lin"]},
                                     {"two_pass": ["lin"], "two_level": ["lin"]}])
def test_fused_column_scales_give_the_unfused_outputs(tmp_path, options):
    rng = np.random.RandomState(5)
    n, k, out = 8, 64, 24
    w = (rng.randn(k, out) * 0.05).astype(np.float32)
    x = rng.randn(1, n, k).astype(np.float32)
    x[0, 0] *= 300.0
    _one_linear(tmp_path / "f.onnx", n, k, w)
    got = {}
    for fused in (False, True):
        quantize_per_token(tmp_path / "f.onnx", tmp_path / f"q{fused}.onnx", fused=fused, **options)
        got[fused] = _run(tmp_path / f"q{fused}.onnx", x)
    assert np.abs(got[True] - got[False]).max() <= 1e-6 * np.abs(got[False]).max()
    ops = [nd.op_type for nd in onnx.load(tmp_path / "qTrue.onnx").graph.node]
    assert "MatMulIntegerToFloat" in ops and "MatMulInteger" not in ops and "Cast" not in ops
    assert _relative(got[True], x @ w) < (1e-3 if len(options) == 2 else 2e-2)  # both: ~15 bits on each side


def test_token2_graphs_spend_more_bits_on_their_roles_only(llama, graphs, tmp_path):
    spec = graphs[1][0]
    feeds = record_calibration(llama, graphs[1], [prompt_of(96, seed=700)])
    token2 = build_int8(graphs[1], feeds, tmp_path, "token2")[0]
    token = build_int8(graphs[1], feeds, tmp_path, "token")[0]
    assert token2.path.endswith("-gptq-2po-2Ldown.onnx") and TOKEN2_TWO_PASS == ("o",) and TOKEN2_TWO_LEVEL == ("down",)
    g = onnx.load(token2.path, load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("MatMulIntegerToFloat") == 4 * 4 and "MatMulInteger" not in ops  # gate|up: one GEMM
    roles = linear_roles(spec.path)
    node = {n.name: n for n in g.node}
    dims = {i.name: list(i.dims) for i in g.initializer}
    for i in range(4):
        assert node[f"{roles[f'{i}.o']}/MatMulIntegerToFloat"].input[0].endswith("/dyn2_u8")  # (2N, in) rows
        assert node[f"{roles[f'{i}.qkv']}/MatMulIntegerToFloat"].input[0].endswith("/dyn_u8")
        down, gate_up = dims[f"{roles[f'{i}.down']}/w_int8"], dims[f"{roles[f'{i}.gate']}/w_int8"]
        assert f"{roles[f'{i}.up']}/w_int8" not in dims and node[f"{roles[f'{i}.gate']}/SplitGroup"].output == [
            {n.name: n for n in onnx.load(spec.path, load_external_data=False).graph.node}[roles[f"{i}.{r}"]].output[0]
            for r in ("gate", "up")]  # gate and up: one GEMM over both one-level column sets, split after
        assert down[1] == 2 * gate_up[0] and gate_up[1] == 2 * down[0]  # down: (inter, 2 x hidden)
    prompt = prompt_of(70, seed=701)
    ref = ChunkedPrefill(llama, graphs[1]).run(prompt).logits
    for s in (token, token2):
        got = ChunkedPrefill(llama, [s]).run(prompt).logits
        assert np.abs(got - ref).max() < 0.5 and got.argmax() == ref.argmax()


def test_fine_builds_unsmoothed_unless_told_and_token2_smoothed():
    from npu_backends.quantize import int8_path

    assert "-sq" not in int8_path("g.onnx", "fine").name and "-sq50-" in int8_path("g.onnx", "token2").name
    assert "-sq50-" in int8_path("g.onnx", "fine", smooth=0.5).name and "-sq" not in int8_path("g.onnx", "token2",
                                                                                                smooth=None).name


def test_token2_roles_are_checked(llama, graphs, tmp_path):
    with pytest.raises(UsageError, match="two_level"):
        build_int8(graphs[1], [[]], tmp_path, "token2", two_level=("mlp",))
    with pytest.raises(UsageError, match="two_pass"):
        build_int8(graphs[1], [[]], tmp_path, "token", two_pass=("gate", "attn"))


def _exact_weights(rng, k: int, out: int) -> np.ndarray:
    """Weights on their own int8 grid (one scale per column): quantize_weight keeps them exactly, so whatever
    error a rewrite leaves is the activations'."""
    levels = rng.randint(-126, 127, (k, out))
    levels[0] = 127
    return (levels * (rng.rand(out) * 0.01 + 0.001)).astype(np.float32)


def test_fine_residual_columns_cut_the_activation_error_in_one_gemm_of_the_same_rows(tmp_path):
    rng = np.random.RandomState(6)
    n, k, out = 16, 128, 48
    w = _exact_weights(rng, k, out)
    x = rng.randn(1, n, k).astype(np.float32)
    _one_linear(tmp_path / "f.onnx", n, k, w)
    errs = {}
    for name, options in (("one", {}), ("stacked", {"two_pass": ["lin"]}), ("fine", {"two_pass": ["lin"], "fine": 11})):
        quantize_per_token(tmp_path / "f.onnx", tmp_path / f"{name}.onnx", fused=True, **options)
        errs[name] = _relative(_run(tmp_path / f"{name}.onnx", x), x @ w)
    assert errs["fine"] < errs["one"] / 4 and errs["stacked"] < errs["fine"], errs  # ~5x, stacked ~100x
    g = onnx.load(tmp_path / "fine.onnx").graph
    assert [list(i.dims) for i in g.initializer if i.name == "lin/w_int8"] == [[2 * k, out]]  # 2 x in rows
    ops = [nd.op_type for nd in g.node]
    assert ops.count("MatMulIntegerToFloat") == 1 and "Split" not in ops and "Add" not in ops  # N output rows


def test_fine_two_level_weights_add_a_third_block_of_rows_not_a_second_set_of_columns(tmp_path):
    rng = np.random.RandomState(8)
    n, k, out = 16, 128, 48
    w = (rng.randn(k, out) * 0.05).astype(np.float32)  # off the int8 grid: the weights' rounding error counts
    x = rng.randn(1, n, k).astype(np.float32)
    _one_linear(tmp_path / "f.onnx", n, k, w)
    errs = {}
    for name, options in (("fine", {}), ("fine3", {"two_level": ["lin"]})):
        quantize_per_token(tmp_path / "f.onnx", tmp_path / f"{name}.onnx", fused=True, two_pass=["lin"], fine=11,
                           **options)
        errs[name] = _relative(_run(tmp_path / f"{name}.onnx", x), x @ w)
    assert errs["fine3"] < errs["fine"] / 3, errs
    g = onnx.load(tmp_path / "fine3.onnx").graph
    assert [list(i.dims) for i in g.initializer if i.name == "lin/w_int8"] == [[3 * k, out]]
    assert "Split" not in [nd.op_type for nd in g.node]


def test_two_pass_takes_single_layers_by_name(llama, graphs, tmp_path):
    feeds = record_calibration(llama, graphs[1], [prompt_of(64, seed=702)])
    spec = build_int8(graphs[1], feeds, tmp_path, "token2", two_pass=("o", "0.down", "2.gate"), two_level=(),
                      fine=11)[0]
    roles = linear_roles(graphs[1][0].path)
    fg = onnx.load(graphs[1][0].path, load_external_data=False).graph
    k = {i.name: i.dims[0] for i in fg.initializer}
    k = {n.name: k[n.input[1]] for n in fg.node if n.name in roles.values()}  # each linear's input width
    dims = {i.name: list(i.dims) for i in onnx.load(spec.path, load_external_data=False).graph.initializer}
    doubled = {key for key, n in roles.items() if f"{n}/w_int8" in dims and dims[f"{n}/w_int8"][0] == 2 * k[n]}
    assert f"{roles['2.up']}/w_int8" in dims and f"{roles['1.up']}/w_int8" not in dims  # 2.gate: its own GEMM
    assert doubled == {"0.o", "1.o", "2.o", "3.o", "0.down", "2.gate"}, doubled
    with pytest.raises(UsageError, match="two_pass"):
        build_int8(graphs[1], feeds, tmp_path, "token2", two_pass=("x.down",))


def test_linears_on_one_input_share_one_gemm_with_each_ones_outputs(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(9)
    n, k = 8, 64
    ws = {"gate": (rng.randn(k, 24) * 0.05).astype(np.float32), "up": (rng.randn(k, 40) * 0.05).astype(np.float32)}
    x = rng.randn(1, n, k).astype(np.float32)
    x[0, 2] *= 50.0
    nodes = [helper.make_node("MatMul", ["x", f"w_{r}"], [f"y_{r}"], name=r) for r in ws]
    nodes.append(helper.make_node("Mul", ["cos", "cos"], ["cos2"]))
    outs = [helper.make_tensor_value_info(f"y_{r}", TensorProto.FLOAT, [1, n, w.shape[1]]) for r, w in ws.items()]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n, k]),
                                             helper.make_tensor_value_info("cos", TensorProto.FLOAT, [n, 2])],
                              [*outs, helper.make_tensor_value_info("cos2", TensorProto.FLOAT, [n, 2])],
                              [numpy_helper.from_array(w, f"w_{r}") for r, w in ws.items()])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "f.onnx"))
    got = {}
    for fused in (False, True):
        quantize_per_token(tmp_path / "f.onnx", tmp_path / f"q{fused}.onnx", fused=fused, two_pass=["gate", "up"],
                           fine=11)
        sess = ort.InferenceSession(str(tmp_path / f"q{fused}.onnx"), providers=["CPUExecutionProvider"])
        got[fused] = sess.run(["y_gate", "y_up"], {"x": x, "cos": np.ones((n, 2), np.float32)})
    ops = [nd.op_type for nd in onnx.load(tmp_path / "qTrue.onnx").graph.node]
    assert ops.count("MatMulIntegerToFloat") == 1 and ops.count("MatMulInteger") == 0  # one GEMM for both
    assert [nd.op_type for nd in onnx.load(tmp_path / "qFalse.onnx").graph.node].count("MatMulInteger") == 2
    for a, b, w in zip(got[False], got[True], ws.values(), strict=True):
        assert a.shape == b.shape == (1, n, w.shape[1])
        assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max()
        assert _relative(b, x @ w) < 2e-2  # the weights' own 8-bit rounding
