"""Dynamic int8 linears (per-token scales; block-wise MatMulNBits), linears kept float by role, and the
evaluation that reads every position and the error layer by layer from the ordinary (last-row) graphs."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_node.model.errors import UsageError
from npu_backends.dynamic import block_weight, quantize_blockwise, quantize_per_token, quantize_weight
from npu_backends.evaluate import agreement, evaluate, residual_points
from npu_backends.export import export_chunk_graphs
from npu_backends.prefill import ChunkedPrefill
from npu_backends.quantize import build_int8, linear_roles, record_calibration
from tests.npu_backends.conftest import CHUNK, CONTEXT, prompt_of


@pytest.fixture(scope="module")
def calibration(llama, graphs):
    return record_calibration(llama, graphs[1], [prompt_of(96, seed=100 + i) for i in range(2)])


def test_weight_quantizers_round_within_half_a_step():
    w = np.random.RandomState(0).randn(40, 24).astype(np.float32)
    w[3, 5] = 50.0  # one outlier: only its own column (per channel) or block (block-wise) pays for it
    q, s = quantize_weight(w)
    assert q.dtype == np.int8 and np.abs(q).max() <= 127
    assert np.all(np.abs(q * s - w) <= s / 2 + 1e-6)
    qb, sb = block_weight(w, 16)  # K = 40: three blocks, the last zero-padded
    assert qb.shape == (24, 3, 16) and sb.shape == (24, 3) and qb.dtype == np.uint8
    deq = ((qb.astype(np.float32) - 128) * sb[..., None]).reshape(24, 48).T  # (K padded, out)
    assert np.all(np.abs(deq[:40] - w) <= np.repeat(sb.T, 16, axis=0)[:40] / 2 + 1e-6)
    assert not deq[40:].any()
    assert sb[6:, 0].max() < sb[5, 0] / 5  # the outlier's block scale stays its own


def _one_linear(path, n: int, k: int, w: np.ndarray) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n, k])
    cos = helper.make_tensor_value_info("cos", TensorProto.FLOAT, [n, 2])  # marks a chunk graph of n rows
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n, w.shape[1]])
    keep = helper.make_node("Mul", ["cos", "cos"], ["cos2"])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="lin"), keep], "one", [x, cos],
                              [y, helper.make_tensor_value_info("cos2", TensorProto.FLOAT, [n, 2])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("rewrite", [quantize_per_token, quantize_blockwise])
def test_a_massive_token_does_not_crush_the_others(tmp_path, rewrite):
    # The attention-sink pattern: one row a thousand times the rest. A static per-tensor scale wide enough
    # for it leaves the other rows less than one level; per-token (or per-token-block) scales do not.
    rng = np.random.RandomState(1)
    n, k = 8, 64
    w = (rng.randn(k, 32) * 0.05).astype(np.float32)
    x = rng.randn(1, n, k).astype(np.float32)
    x[0, 0] *= 1000.0
    _one_linear(tmp_path / "f.onnx", n, k, w)
    assert rewrite(tmp_path / "f.onnx", tmp_path / "q.onnx") == ["lin"]
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["y"], {"x": x, "cos": np.ones((n, 2), np.float32)})[0]
    ref = x @ w
    rel = np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)  # (1, n)
    assert rel.max() < 0.02, rel


@pytest.mark.parametrize("mode,op", [("dynamic", "MatMulInteger"), ("block", "MatMulNBits")])
def test_dynamic_graphs_quantize_every_linear_but_the_head_and_rotations(graphs, calibration, tmp_path, mode, op):
    spec = build_int8(graphs[1], calibration, tmp_path, mode)[0]
    g = onnx.load(spec.path, load_external_data=False).graph
    assert sum(n.op_type == op for n in g.node) == 4 * 5  # qkv, o, gate, up, down per layer
    float_mm = [n for n in g.node if n.op_type == "MatMul"]
    assert len(float_mm) == 4 + 1  # the down rotations, the head (GroupQueryAttention holds q.k and p.v)
    assert next(n for n in g.node if n.output[0] == "logits").op_type == "MatMul"
    if mode == "dynamic":  # one quantization per distinct input: gate and up share theirs
        assert sum(n.op_type == "QuantizeLinear" for n in g.node) == 4 * 4


def test_keep_float_leaves_the_named_linears_float(graphs, calibration, tmp_path):
    roles = linear_roles(graphs[1][0].path)
    assert len(roles) == 4 * 5 and set(roles) >= {"0.qkv", "0.down", "3.up"}
    spec = build_int8(graphs[1], calibration, tmp_path, "block", keep_float=["0.down", "3.qkv"])[0]
    g = onnx.load(spec.path, load_external_data=False).graph
    ops = {n.name: n.op_type for n in g.node}
    assert ops[roles["0.down"]] == ops[roles["3.qkv"]] == "MatMul" and ops[roles["1.down"]] == "MatMulNBits"
    assert sum(op == "MatMulNBits" for op in ops.values()) == 18
    with pytest.raises(UsageError, match="LAYER.ROLE"):
        build_int8(graphs[1], calibration, tmp_path, "block", keep_float=["down.0"])


def test_linear_roles_number_layers_from_the_groups_start(llama, graphs):
    second = graphs[2][1]  # layers [2, 4)
    roles = linear_roles(second.path, second.start)
    assert sorted(roles) == sorted(f"{i}.{r}" for i in (2, 3) for r in ("qkv", "o", "gate", "up", "down"))
    inits = {i.name: i.dims for i in onnx.load(second.path, load_external_data=False).graph.initializer}
    node = {n.name: n for n in onnx.load(second.path, load_external_data=False).graph.node}
    cfg = llama.config
    assert list(inits[node[roles["2.down"]].input[1]]) == [cfg.intermediate_size, cfg.hidden_size]
    assert list(inits[node[roles["3.gate"]].input[1]]) == [cfg.hidden_size, cfg.intermediate_size]


def test_evaluate_reads_every_position_as_the_all_rows_graphs_do(llama, graphs, tmp_path):
    prompts = [prompt_of(CONTEXT, seed=7), prompt_of(CONTEXT - 20, seed=8)]  # the second ends mid-chunk
    same = evaluate(llama, graphs[1], graphs[1], prompts)
    assert same.agreement.top1 == 1.0 and same.agreement.max_abs_err < 1e-4
    assert len(same.relative_error) == 2 * 4 + 1 == len(residual_points(graphs[1][0].path))
    assert max(same.relative_error) < 1e-5
    # No calibration needed without smoothing: the same int8 rewrite of the last-row and the all-rows graphs.
    rows = export_chunk_graphs(llama, tmp_path / "all", CHUNK, CONTEXT, all_logits=True)
    q_last = build_int8(graphs[1], [[]], tmp_path / "q", "block", smooth=None, rotate=None)
    q_rows = build_int8(rows, [[]], tmp_path / "q", "block", smooth=None, rotate=None)
    ev = evaluate(llama, graphs[1], q_last, prompts)
    direct = agreement(ChunkedPrefill(llama, rows), ChunkedPrefill(llama, q_rows), prompts)
    assert ev.agreement.positions == direct.positions == sum(map(len, prompts))
    assert ev.agreement.top1 == pytest.approx(direct.top1, abs=1 / direct.positions)
    assert ev.agreement.mean_abs_err == pytest.approx(direct.mean_abs_err, rel=1e-2)
    assert ev.relative_error[0] < 1e-6 < ev.relative_error[-1]  # the embeddings are exact, the layers are not
    assert [set(d) for d in ev.per_layer()] == [{"layer", "after_attention", "after_mlp"}] * 4
