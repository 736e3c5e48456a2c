"""Group-wise int8 with float32 or float16 scales (`edgefed quantize --group-size 32 --scale-dtype float32|float16`,
the native decode step's layouts): exact on the grids imported GGUF weights lie on, self-described in config.json,
loadable with and without the native kernels."""

from __future__ import annotations

import json

import pytest
import torch

from quant.format import QuantConfig, QuantConfigError, QuantizeError
from quant.int8 import dequantize_groups8, quantize_groups8


def test_float32_group_scales_reproduce_q8_0_and_q4_1_grids_exactly():
    torch.manual_seed(0)
    d = torch.rand(64, 1) * 0.01 + 1e-3  # per group of 32
    codes = torch.randint(-127, 128, (64, 32))
    codes[:, 7] = 127  # a Q8_0 group's scale is its largest |w| / 127
    q8_0 = (codes.float() * d).reshape(4, 512)  # symmetric: q * d
    m = -torch.rand(64, 1) * 0.05
    steps = torch.randint(0, 16, (64, 32))
    steps[:, 3], steps[:, 9] = 0, 15  # a group's own min and max: Q4_1's grid spans them
    q4_1 = (m + steps.float() * d).reshape(4, 512)  # asymmetric: min + j * d
    for name, w in (("Q8_0", q8_0), ("Q4_1", q4_1)):
        q, s, z = quantize_groups8(w, 32, torch.float32)
        assert s.dtype == z.dtype == torch.float32
        err = (dequantize_groups8(q, s, z) - w).abs().max().item()
        assert err <= 1e-6 * w.abs().max().item(), f"{name} grid: error {err:.3g}"
    w = (codes.float() * d.half().float()).reshape(4, 512)  # a real Q8_0 group: its scale is a float16
    q, s, z = quantize_groups8(w, 32, torch.float16)  # Q8_0's own scale type: its grid, exactly
    assert s.dtype == z.dtype == torch.float16 and not z.any()
    assert (dequantize_groups8(q, s, z) - w).abs().max() <= 1e-6 * w.abs().max()
    w = torch.randn(8, 64) * 0.05
    w[0, :32], w[1, :32] = 0.0, 1e-7  # a zero group and one below float16's normal range: finite, no 0 scale
    q, s, z = quantize_groups8(w, 32, torch.float16)
    err16 = (dequantize_groups8(q, s, z) - w).abs().amax(-1)
    q, s, z = quantize_groups8(w, 32, torch.float32)
    err32 = (dequantize_groups8(q, s, z) - w).abs().amax(-1)
    assert torch.isfinite(err16).all() and (err16 <= 1.1 * err32 + 1e-7).all()
    _, s, z = quantize_groups8(torch.randn(8, 64), 32)  # the bfloat16 layout is unchanged
    assert s.dtype == z.dtype == torch.bfloat16


def test_scale_dtype_is_self_described_and_checked():
    q = QuantConfig.make("int8", 32)
    assert q.scale_dtype == "float32" and q.to_json()["scale_dtype"] == "float32"
    assert q.params("m.weight", (8, 64))["m.weight_scale"] == ((8, 2), "F32")
    assert QuantConfig.from_config({"quantization_config": q.to_json()}, "c") == q
    old = QuantConfig.make("int8", 32, scale_dtype="bfloat16").to_json()
    assert "scale_dtype" not in old and QuantConfig.from_config({"quantization_config": old}, "c").scale_dtype == \
        "bfloat16"
    with pytest.raises(QuantizeError, match="--scale-dtype"):
        QuantConfig.make("int4", 32, scale_dtype="float32")
    h = QuantConfig.make("int8", 32, scale_dtype="float16")
    assert h.params("m.weight", (8, 64))["m.weight_zero"] == ((8, 2), "F16")
    assert QuantConfig.from_config({"quantization_config": h.to_json()}, "c") == h
    with pytest.raises(QuantConfigError, match="scale_dtype 'float64'"):
        QuantConfig.from_config({"quantization_config": {**q.to_json(), "scale_dtype": "float64"}}, "c")
    with pytest.raises(QuantConfigError, match="scale_dtype 'float16'"):
        QuantConfig.from_config({"quantization_config": {**QuantConfig.make("int4", 32).to_json(),
                                                         "scale_dtype": "float16"}}, "c")


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_a_float32_scale_checkpoint_loads_the_same_with_and_without_native_code(tmp_path, monkeypatch, scale_dtype):
    from edge_node.model.native import build
    from quant.checkpoint import load_any
    from quant.quantize import quantize_checkpoint
    from tests.parity import realistic_checkpoint

    realistic_checkpoint(tmp_path / "f", tie=True)
    quantize_checkpoint(tmp_path / "f", tmp_path / "q", "int8", 32, lm_head="int8", scale_dtype=scale_dtype)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["scale_dtype"] == \
        scale_dtype
    ids = torch.tensor([[1, 5, 9, 30, 2, 7]])
    with torch.inference_mode():
        model = load_any(tmp_path / "q", pack=True)  # native: float32 scales and math
        got = model(ids, model.new_cache(), 0)
        monkeypatch.setenv("EDGEFED_NATIVE", "0")
        build.library.cache_clear()
        try:
            ref_model = load_any(tmp_path / "q", pack=True)  # torch's int4-pair kernel: bfloat16 scales and math
            ref = ref_model(ids, ref_model.new_cache(), 0)
        finally:
            monkeypatch.undo()
            build.library.cache_clear()
    assert (got - ref).abs().max() <= 0.1 * ref.std()  # bfloat16 activations and outputs on the torch side
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
