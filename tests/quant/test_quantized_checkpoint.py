"""`edgefed quantize` then load: the checkpoint on disk says what it is, the loaded model multiplies by exactly
the stored weights (fused linears included), float checkpoints load as before, and `shard` reads a quantized
directory as its dequantized weights.

Closeness to the float model is measured on the trained demo model (test_quantized_demo.py): on random
weights at a realistic scale, 4-bit rounding (~9% of each weight) moves a 4-layer model's logits by about half
their RMS, so "close to float" there only bounds int8.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from edge_node.model import load_model
from edge_node.model.layout import LINEARS
from quant.checkpoint import load_any, load_quantized
from quant.format import QuantConfig
from quant.int4 import Int4Linear, dequantize_groups
from quant.int8 import Int8GroupLinear, Int8Linear, dequantize_groups8, dequantize_rows
from quant.quantize import quantize_checkpoint
from tests.parity import prompts, realistic_checkpoint
from tests.quant.conftest import dequantized_copy, logits, rel_rms

# (weights, group size, head); TINY's intermediate_size 160 takes groups of 32 only (int8's default: one scale per row)
MODES = [("int8", None, "float"), ("int8", None, "int8"), ("int8", 32, "float"), ("int8", 32, "int8"),
         ("int4", 32, "float"), ("int4", 32, "int4"), ("int4", 32, "int8")]


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def source(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    realistic_checkpoint(path, tie=request.param)
    (path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    return path


def ids() -> torch.Tensor:
    return torch.tensor(prompts(256))  # (2, 64)


def test_quantized_checkpoint_says_what_it_is(source, tmp_path):
    quantize_checkpoint(source, tmp_path / "q", "int4", 32)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "edgefed", "weights": "int4", "group_size": 32,
                                          "format": 1, "lm_head": "int8"}
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == json.loads((source / "config.json")
                                                                                      .read_text())
    for name in ("generation_config.json", "chat_template.jinja"):
        assert (tmp_path / "q" / name).read_bytes() == (source / name).read_bytes()
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        q = f.get_slice("model.layers.0.self_attn.q_proj.weight")
        assert (q.get_dtype(), q.get_shape()) == ("U8", [64, 32])  # (out, in/2): two codes a byte
        s = f.get_slice("model.layers.0.mlp.down_proj.weight_scale")
        assert (s.get_dtype(), s.get_shape()) == ("BF16", [64, 5])  # (out, in/G) = 160 / 32
        assert f.get_slice("model.layers.0.input_layernorm.weight").get_dtype() == "F32"
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"


@pytest.mark.parametrize("weights,group,head", MODES)
def test_loaded_model_multiplies_by_the_stored_weights(source, tmp_path, weights, group, head):
    """Against a float model holding the dequantized weights: only the kernels' bfloat16 activations differ."""
    quantize_checkpoint(source, tmp_path / "q", weights, group, lm_head=head)
    ref = logits(load_model(dequantized_copy(tmp_path / "q", tmp_path / "dq")), ids())
    for pack in (False, True):
        got = logits(load_any(tmp_path / "q", pack=pack), ids())
        # measured 0.02-0.08 (bf16 activations in a model this sensitive); a wrong nibble, scale or fuse order
        # gives ~1
        assert rel_rms(got, ref) < 0.15
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


def test_int8_logits_stay_close_to_float(source, tmp_path):
    quantize_checkpoint(source, tmp_path / "q", "int8")
    ref, got = logits(load_model(source), ids()), logits(load_any(tmp_path / "q", pack=True), ids())
    assert rel_rms(got, ref) < 0.1  # measured 0.06: int8's ~0.5% weight error, amplified by this model


@pytest.mark.parametrize("weights,group", [("int8", None), ("int8", 32), ("int4", 32)])
def test_fused_linears_hold_their_parts_scales_in_layout_order(source, tmp_path, weights, group):
    quantize_checkpoint(source, tmp_path / "q", weights, group)
    block = load_quantized(tmp_path / "q").blocks["0"]
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        def part(module: str) -> torch.Tensor:
            base = f"model.layers.0.{module}.weight"
            if weights == "int8" and group is None:
                return dequantize_rows(f.get_tensor(base), f.get_tensor(base + "_scale"))
            dequantize = dequantize_groups8 if weights == "int8" else dequantize_groups
            return dequantize(f.get_tensor(base), f.get_tensor(base + "_scale"), f.get_tensor(base + "_zero"))

        kind = {("int8", None): Int8Linear, ("int8", 32): Int8GroupLinear, ("int4", 32): Int4Linear}[weights, group]
        for spec in LINEARS:
            linear = getattr(block.attn if spec.owner == "attn" else block.mlp, spec.name)
            assert isinstance(linear, kind)
            assert torch.equal(linear.weight, torch.cat([part(p.module) for p in spec.parts]))


def test_load_any_loads_a_float_checkpoint_as_load_model_does(source):
    assert torch.equal(logits(load_any(source), ids()), logits(load_model(source), ids()))
    assert QuantConfig.from_dir(source) is None


def test_int8_shards_of_a_per_row_int8_checkpoint_equal_those_of_its_float_source(source, tmp_path):
    """One node: per-row requantization of dequantized int8 rows gives back the same codes and scales. With
    more nodes, o_proj's and down_proj's rows are cut by columns and each piece gets its own scale: the
    stored codes are then rounded a second time, onto another grid, and the shards differ slightly."""
    from safetensors.torch import load_file

    from edge_node.shard import write_shards

    quantize_checkpoint(source, tmp_path / "q", "int8", -1, lm_head="int8")
    direct = write_shards(source, tmp_path / "a", 1, weights="int8")
    via_q = write_shards(tmp_path / "q", tmp_path / "b", 1, weights="int8")
    assert [f["path"] for f in direct["files"]] == [f["path"] for f in via_q["files"]]
    for f in direct["files"]:
        a, b = load_file(str(tmp_path / "a" / f["path"])), load_file(str(tmp_path / "b" / f["path"]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f["path"]


def test_shards_of_an_int4_checkpoint_run_its_dequantized_weights(source, tmp_path):
    from edge_node.collectives import Comm
    from edge_node.engine import RankEngine
    from edge_node.run_config import RunConfig
    from edge_node.shard import write_shards

    quantize_checkpoint(source, tmp_path / "q", "int4", 32, lm_head="int4")
    write_shards(tmp_path / "q", tmp_path / "s", 1)
    write_shards(tmp_path / "q", tmp_path / "s2", 2, weights="int8")  # a tensor-parallel plan shards it too
    engine = RankEngine(RunConfig(shards=str(tmp_path / "s")), Comm(0, 1, ""), 64)
    got = engine.score(prompts(256)[0])
    engine.close()
    ref = logits(load_model(dequantized_copy(tmp_path / "q", tmp_path / "dq")), ids()[:1])[0]
    assert (got - ref).abs().max() <= 1e-4 * ref.std()


@pytest.mark.parametrize("weights,group", [("int8", None), ("int8", 32), ("int4", 32)])
def test_biases_stay_float_beside_quantized_weights(tmp_path, weights, group):
    realistic_checkpoint(tmp_path / "f", arch="qwen2")  # q/k/v biases
    quantize_checkpoint(tmp_path / "f", tmp_path / "q", weights, group)
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.k_proj.bias").get_dtype() == "F32"
    ref = logits(load_model(dequantized_copy(tmp_path / "q", tmp_path / "dq")), ids())
    assert rel_rms(logits(load_any(tmp_path / "q", pack=True), ids()), ref) < 0.15
