"""int8 weight-only quantization: per-channel error bound, the int8 matmul, and the int8 shards' size."""

from __future__ import annotations

import torch

from quant.int8 import Int8Linear, dequantize_rows, quantize_rows


def test_per_channel_error_is_at_most_half_a_step():
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scales
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    err = (dequantize_rows(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()


def test_int8_linear_matches_the_dequantized_float_linear():
    w, b = torch.randn(48, 32), torch.randn(48)
    q, scale = quantize_rows(w)
    x = torch.randn(2, 5, 32)
    expected = torch.nn.functional.linear(x, dequantize_rows(q, scale), b)
    got = Int8Linear(q, scale, b)(x)
    assert got.shape == (2, 5, 48)
    assert torch.allclose(got, expected, atol=0.05, rtol=0.02)  # bf16 activations in the kernel


def test_int8_linear_pads_in_features_the_kernel_cannot_take():
    w = torch.randn(24, 54)  # 54 % 16 != 0: the raw kernel crashes on such shapes for more than one row
    q, scale = quantize_rows(w)
    x = torch.randn(4, 54)
    got = Int8Linear(q, scale)(x)
    assert torch.allclose(got, x @ dequantize_rows(q, scale).T, atol=0.05, rtol=0.02)


def test_int8_linear_runs_in_bfloat16():
    q, scale = quantize_rows(torch.randn(16, 32))
    y = Int8Linear(q, scale)(torch.randn(3, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 16)


def test_int8_shards_are_about_a_quarter_of_float32(llama_dir, tmp_path):
    from edge_node.shard import write_shards

    f32 = write_shards(llama_dir, tmp_path / "f", 2)
    i8 = write_shards(llama_dir, tmp_path / "q", 2, weights="int8")
    total = lambda m: sum(f["bytes"] for f in m["files"])  # noqa: E731
    assert total(i8) / total(f32) < 0.33
