"""int8 weight-only quantization: per-row and per-group error bounds, the int8 matmuls, and the int8 shards' size."""

from __future__ import annotations

import pytest
import torch

from quant.int8 import Int8GroupLinear, Int8Linear, dequantize_groups8, dequantize_rows, quantize_groups8, quantize_rows


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


def q4_1_grid(rows: int, cols: int, group: int = 32) -> torch.Tensor:
    """Weights as a Q4_1 GGUF stores them: per group of 32, w = d * j + m with j in [0, 15]."""
    g = torch.Generator().manual_seed(0)
    d = 10 ** (-4 + 2 * torch.rand(rows, cols // group, 1, generator=g))  # steps over two decades, as in real models
    m = -8 * d + torch.randn(rows, cols // group, 1, generator=g) * d
    j = torch.randint(0, 16, (rows, cols // group, group), generator=g).float()
    return (d * j + m).reshape(rows, cols)


def test_group_error_is_at_most_a_step_with_bfloat16_scales_and_zeros():
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]
    q, scales, zeros = quantize_groups8(w, 32)
    assert (q.dtype, scales.dtype, zeros.dtype) == (torch.int8, torch.bfloat16, torch.bfloat16)
    assert scales.shape == zeros.shape == (64, 3)
    err = (dequantize_groups8(q, scales, zeros) - w).abs()
    step = scales.float().repeat_interleave(32, dim=1)
    assert (err <= step + 1e-9).all()  # half a step, plus where bf16 rounding of s and z clamps the top code
    assert (err <= step / 2 * 1.001 + 1e-9).float().mean() > 0.99


def test_groups_follow_a_group_wise_grid_that_one_scale_per_row_cannot():
    w = q4_1_grid(128, 256)

    def relative_error(approx: torch.Tensor) -> float:
        """Median over groups of the error's RMS relative to the group's own RMS."""
        rms = lambda t: t.reshape(128, -1, 32).pow(2).mean(-1).sqrt()  # noqa: E731  (rows, groups)
        return (rms(approx - w) / rms(w)).median().item()

    row_err = relative_error(dequantize_rows(*quantize_rows(w)))
    group_err = relative_error(dequantize_groups8(*quantize_groups8(w, 32)))
    assert group_err < row_err / 3  # measured 0.0036 against 0.0225


@pytest.mark.parametrize("out,cols,group", [(48, 64, 32), (100, 256, 64), (40, 96, 32), (16, 384, 128)])
def test_int8_group_linear_multiplies_by_exactly_the_stored_weights(out, cols, group):
    w, b = torch.randn(out, cols) + torch.rand(out, 1), torch.randn(out)
    q, scales, zeros = quantize_groups8(w, group)
    lin = Int8GroupLinear(q, scales, zeros, b)
    assert torch.equal(lin.weight, dequantize_groups8(q, scales, zeros))  # the hi/lo split loses nothing
    x = torch.randn(2, 5, cols)
    expected = torch.nn.functional.linear(x, dequantize_groups8(q, scales, zeros), b)
    got = lin(x)
    assert got.shape == (2, 5, out)
    # bf16 activations and outputs in the kernel: measured 0.002-0.004; a wrong nibble or group gives ~1
    assert ((got - expected).norm() / expected.norm()) < 0.01


def test_int8_group_linear_refuses_mismatched_scales():
    q, scales, zeros = quantize_groups8(torch.randn(16, 64), 32)
    with pytest.raises(ValueError, match="Int8GroupLinear needs"):
        Int8GroupLinear(q, scales[:, :1], zeros)
