"""Graph directories record what their graphs were built from: graphs of other weights or settings are rebuilt
(build_prefill) or refused (open_prefill_dir), never run in place of the model's own."""

import json
import os
import shutil

import numpy as np
import pytest

from edge_node.model import EdgefedError, load_model
from npu_backends.build import GraphDirError, build_prefill, open_prefill_dir, weights_digest
from npu_backends.export import EXPORT_FORMAT, load_provenance, read_graphs_json
from npu_backends.measure import torch_prefill
from npu_backends.options import PrefillOptions
from tests.checkpoints import make_checkpoint
from tests.npu_backends.conftest import prompt_of

PROMPT = prompt_of(40, seed=3)  # two chunks of 32 in a context of 64


def opts(graphs, **kw) -> PrefillOptions:
    return PrefillOptions(**{"chunk": 32, "context": 64, "graph_dir": str(graphs), "calib_tokens": 128, **kw})


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Checkpoints A and B: the same shapes, other weights (as a federated round's fine-tuned copy)."""
    root = tmp_path_factory.mktemp("two")
    make_checkpoint(root / "a", seed=0)
    make_checkpoint(root / "b", seed=1)
    return {k: (root / k, load_model(root / k)) for k in "ab"}


def age(graphs) -> None:
    """Mark every graph file old, so a rewrite shows whatever the file system's mtime resolution."""
    for f in graphs.glob("*.onnx*"):
        os.utime(f, ns=(0, 0))


def rewritten(graphs, pattern: str) -> list[bool]:
    files = sorted(graphs.glob(pattern))
    assert files
    return [f.stat().st_mtime_ns != 0 for f in files]


def logits(prefill) -> np.ndarray:
    return prefill.run(PROMPT).logits


def test_weights_digest_follows_the_weights_and_config_not_the_path(two, tmp_path):
    (a, _), (b, _) = two["a"], two["b"]
    shutil.copytree(a, tmp_path / "copy")
    assert weights_digest(tmp_path / "copy") == weights_digest(a) != weights_digest(b)
    cfg = json.loads((tmp_path / "copy" / "config.json").read_text())
    (tmp_path / "copy" / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}))
    assert weights_digest(tmp_path / "copy") != weights_digest(a)


def test_build_prefill_rebuilds_float_graphs_when_the_weights_change_in_place(tmp_path):
    m, graphs = tmp_path / "m", tmp_path / "g"
    make_checkpoint(m, seed=0)
    model_a = load_model(m)
    ref_a = torch_prefill(model_a, PROMPT)[0]
    np.testing.assert_allclose(logits(build_prefill(model_a, m, opts(graphs))), ref_a, atol=1e-4)
    digest_a = load_provenance(graphs)["weights"]
    assert digest_a == weights_digest(m)
    age(graphs)
    make_checkpoint(m, seed=1)  # fine-tuned in place: same shapes, other weights
    model_b = load_model(m)
    ref_b = torch_prefill(model_b, PROMPT)[0]
    got = logits(build_prefill(model_b, m, opts(graphs)))
    np.testing.assert_allclose(got, ref_b, atol=1e-4)  # B's logits, not A's
    assert np.abs(ref_a - ref_b).max() > 1e-2
    assert load_provenance(graphs)["weights"] == weights_digest(m) != digest_a
    assert all(rewritten(graphs, "*.onnx"))
    age(graphs)
    np.testing.assert_allclose(logits(build_prefill(model_b, m, opts(graphs))), ref_b, atol=1e-4)
    assert not any(rewritten(graphs, "*.onnx"))  # matching graphs are still reused


def test_int8_graphs_are_rebuilt_for_other_weights_and_stale_copies_do_not_survive(two, tmp_path):
    (a, model_a), (b, model_b) = two["a"], two["b"]
    graphs = tmp_path / "g"
    build_prefill(model_a, a, opts(graphs, int8=True))
    assert read_graphs_json(graphs)["int8"]["minmax"]["calib_tokens"] == 128
    age(graphs)
    got = logits(build_prefill(model_b, b, opts(graphs, int8=True)))
    assert load_provenance(graphs)["weights"] == weights_digest(b) != weights_digest(a)
    assert all(rewritten(graphs, "*.int8-minmax*.onnx")) and all(rewritten(graphs, "*_L0-4.onnx"))
    ref_a, ref_b = torch_prefill(model_a, PROMPT)[0], torch_prefill(model_b, PROMPT)[0]
    assert np.abs(got - ref_b).max() < np.abs(got - ref_a).max() / 5  # B's int8 graphs, not A's
    # Float graphs exported again (for A) take every int8 copy of the graphs they replace with them.
    build_prefill(model_a, a, opts(graphs))
    assert not list(graphs.glob("*.int8-*")) and read_graphs_json(graphs)["int8"] == {}


def test_int8_graphs_built_with_other_settings_are_rebuilt_or_refused(two, tmp_path):
    a, model_a = two["a"]
    graphs = tmp_path / "g"
    build_prefill(model_a, a, opts(graphs, int8=True))
    age(graphs)
    build_prefill(model_a, a, opts(graphs, int8=True))
    assert not any(rewritten(graphs, "*.onnx*"))  # same weights, same settings: reused
    build_prefill(model_a, a, opts(graphs, int8=True, calib_tokens=64))
    assert all(rewritten(graphs, "*.int8-minmax*.onnx")) and not any(rewritten(graphs, "*_L0-4.onnx"))
    with pytest.raises(GraphDirError, match="calib_tokens 64") as e:
        open_prefill_dir(model_a, opts(graphs, int8=True), weights_digest(a))  # calib_tokens 128
    assert str(graphs) in str(e.value) and "--int8" in str(e.value)
    open_prefill_dir(model_a, opts(graphs, int8=True, calib_tokens=64), weights_digest(a))


def test_open_prefill_dir_refuses_graphs_of_other_weights(two, tmp_path):
    (a, model_a), (b, model_b) = two["a"], two["b"]
    graphs = tmp_path / "g"
    build_prefill(model_a, a, opts(graphs))
    with pytest.raises(GraphDirError) as e:
        open_prefill_dir(model_b, opts(graphs), expected_digest=weights_digest(b))
    assert isinstance(e.value, EdgefedError)
    assert str(graphs) in str(e.value) and f"edgefed prefill --model DIR --graph-dir {graphs}" in str(e.value)
    ref_a = torch_prefill(model_a, PROMPT)[0]
    np.testing.assert_allclose(logits(open_prefill_dir(model_a, opts(graphs), weights_digest(a))), ref_a, atol=1e-4)
    np.testing.assert_allclose(logits(open_prefill_dir(model_a, opts(graphs))), ref_a, atol=1e-4)  # no digest


def test_a_graph_dir_without_provenance_is_refused_by_open_and_rebuilt_by_build(two, tmp_path):
    a, model_a = two["a"]
    graphs = tmp_path / "g"
    build_prefill(model_a, a, opts(graphs))
    # graphs.json as edgefed wrote it before provenance: a bare list of the graphs
    (graphs / "graphs.json").write_text(json.dumps(read_graphs_json(graphs)["graphs"]))
    for digest in (None, weights_digest(a)):
        with pytest.raises(GraphDirError, match="do not record what they were exported from") as e:
            open_prefill_dir(model_a, opts(graphs), digest)
        assert str(graphs) in str(e.value) and "edgefed prefill --model DIR" in str(e.value)
    age(graphs)
    build_prefill(model_a, a, opts(graphs))
    assert all(rewritten(graphs, "*.onnx"))
    assert load_provenance(graphs) == {"format": EXPORT_FORMAT, "weights": weights_digest(a),
                                       "export": {"chunk": 32, "context": 64, "groups": 1, "all_logits": False,
                                                  "fused_attention": True}}
    open_prefill_dir(model_a, opts(graphs), weights_digest(a))


def test_plain_attention_is_its_own_export(two, tmp_path):
    """--plain-attention graphs are rebuilt for a fused run and back; fused graphs are refused where the CPU
    fall-back their GroupQueryAttention needs is forbidden, with the command that exports plain ones."""
    a, model_a = two["a"]
    graphs = tmp_path / "g"
    fused = build_prefill(model_a, a, opts(graphs))
    assert fused.specs[0].fused and load_provenance(graphs)["export"]["fused_attention"]
    with pytest.raises(GraphDirError, match="GroupQueryAttention.*--plain-attention`"):
        open_prefill_dir(model_a, opts(graphs, provider="qnn", strict=True), weights_digest(a))
    age(graphs)
    plain = build_prefill(model_a, a, opts(graphs, fused_attention=False))
    assert all(rewritten(graphs, "*.onnx")) and not plain.specs[0].fused
    assert not load_provenance(graphs)["export"]["fused_attention"]
    np.testing.assert_allclose(logits(plain), logits(fused), atol=1e-4)


def test_graphs_of_another_export_format_are_refused_and_rebuilt(two, tmp_path):
    a, model_a = two["a"]
    graphs = tmp_path / "g"
    build_prefill(model_a, a, opts(graphs))
    record = read_graphs_json(graphs)
    record["provenance"]["format"] = EXPORT_FORMAT - 1
    (graphs / "graphs.json").write_text(json.dumps(record))
    with pytest.raises(GraphDirError, match="export format"):
        open_prefill_dir(model_a, opts(graphs))
    age(graphs)
    build_prefill(model_a, a, opts(graphs))
    assert all(rewritten(graphs, "*.onnx")) and load_provenance(graphs)["format"] == EXPORT_FORMAT
