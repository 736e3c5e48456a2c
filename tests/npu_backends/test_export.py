"""Exported chunk graphs have fully static inputs, and the exporter refuses what it cannot make static."""

import onnx
import pytest
import torch

from npu_backends.export import check_static, export_chunk_graphs, split_layers


def test_every_graph_input_and_output_is_static(graphs):
    for spec in graphs[1] + graphs[2]:
        check_static(spec.path)
        g = onnx.load(spec.path, load_external_data=False).graph
        shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
        # context T = 128 tokens: C = T - N = 96 past slots, so 96 + 32 keys per chunk
        assert shapes["cos"] == [32, 8] and shapes["mask"] == [1, 1, 32, 128]
        assert shapes[f"past_k_{spec.start}"] == [1, 2, 96, 8]


def test_layer_groups_cover_the_model_in_order(graphs):
    assert [(s.start, s.end, s.first, s.last) for s in graphs[2]] == [(0, 2, True, False), (2, 4, False, True)]
    assert split_layers(24, 5) == [(0, 5), (5, 10), (10, 14), (14, 19), (19, 24)]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_dynamic_dimension_is_rejected(tmp_path):
    path = tmp_path / "dyn.onnx"
    torch.onnx.export(torch.nn.Linear(4, 4), (torch.ones(2, 4),), str(path), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    with pytest.raises(ValueError, match="dynamic dimension"):
        check_static(path)


def test_unsupported_chunk_size_is_refused(llama, tmp_path):
    with pytest.raises(ValueError, match="supported sizes"):
        export_chunk_graphs(llama, tmp_path, 48, 96)
