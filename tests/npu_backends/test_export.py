"""Exported chunk graphs have fully static inputs, and the exporter refuses what it cannot make static."""

import onnx
import pytest
import torch

from npu_backends.export import check_static, export_chunk_graphs, split_layers


def test_every_graph_input_and_output_is_static(graphs):
    for spec in graphs[1] + graphs[2] + graphs["plain"]:
        check_static(spec.path)
        g = onnx.load(spec.path, load_external_data=False).graph
        shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
        # context T = 128: a fused layer reads the host's whole T-slot buffer, a masked one its C = T - N = 96
        assert shapes["cos"] == [32, 8] and shapes[f"past_k_{spec.start}"] == [1, 2, 128 if spec.fused else 96, 8]
        fused = [n for n in g.node if n.op_type == "GroupQueryAttention"]
        outputs = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in g.output}
        # a fused layer's present is its whole cache with the chunk written at pos0, else the chunk's own rows
        assert outputs[f"present_v_{spec.start}"] == [1, 2, 128 if spec.fused else 32, 8]
        if spec.fused:  # the op reads the written past slots: their count and the total instead of a mask
            assert "mask" not in shapes and len(fused) == spec.end - spec.start
            assert shapes["seqlens_k"] == [1] and shapes["total_sequence_length"] == []
        else:  # context T = 128 tokens: C = T - N = 96 past slots, so 96 + 32 keys per chunk
            assert shapes["mask"] == [1, 1, 32, 128] and not fused and "seqlens_k" not in shapes
    assert all(s.fused for s in graphs[1] + graphs[2]) and not graphs["plain"][0].fused


def test_fused_attention_is_left_out_where_it_cannot_run():
    from npu_backends.options import PrefillOptions

    assert PrefillOptions().fused and PrefillOptions(strict=True).fused  # the CPU EP runs the contrib op
    assert PrefillOptions(provider="qnn").fused  # an accelerator leaves the node to the CPU fall-back ...
    assert not PrefillOptions(provider="qnn", strict=True).fused  # ... which strict forbids: plain ops
    assert not PrefillOptions(fused_attention=False).fused


def test_fused_attention_needs_past_slots(llama, tmp_path):
    assert not export_chunk_graphs(llama, tmp_path / "one", 32, 32)[0].fused  # C = 0: a plain causal mask


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
