"""int4 weight-only quantization: the stored format, and torch's int4 kernel against a dequantized float matmul."""

from __future__ import annotations

import pytest
import torch

import quant.int4 as int4
from quant.int4 import (
    Int4Linear,
    _kernel_layout,
    dequantize_groups,
    pack_nibbles,
    quantize_groups,
    unpack_nibbles,
)

needs_kernel = pytest.mark.skipif(not int4._INT4_KERNEL, reason="this torch build has no int4 CPU kernel")


def test_nibbles_hold_even_columns_low_and_odd_columns_high():
    q = torch.tensor([[1, 2, 15, 0]])
    packed = pack_nibbles(q)
    assert packed.tolist() == [[1 | 2 << 4, 15]]
    assert torch.equal(unpack_nibbles(packed), q.int())


def test_group_error_is_at_most_half_a_step_and_scales_are_bfloat16():
    w = torch.randn(32, 128) * torch.logspace(-3, 1, 32)[:, None]  # rows of very different scales
    codes, scales, zeros = quantize_groups(w, 32)
    assert codes.shape == (32, 64) and codes.dtype == torch.uint8
    assert scales.shape == zeros.shape == (32, 4) and scales.dtype == zeros.dtype == torch.bfloat16
    err = (dequantize_groups(codes, scales, zeros) - w).abs()
    step = scales.float().repeat_interleave(32, dim=1)
    # half a step, plus what rounding the scale and offset to bfloat16 moves the grid (< 1% of a step)
    assert (err <= step * 0.51 + 1e-6).all()


@needs_kernel
@pytest.mark.parametrize("out,cols,group", [(48, 64, 32), (100, 256, 64), (64, 384, 128), (32, 512, 256)])
def test_int4_kernel_equals_the_dequantized_float_matmul(out, cols, group):
    torch.manual_seed(0)
    w, b = torch.randn(out, cols) * 0.05, torch.randn(out)
    codes, scales, zeros = quantize_groups(w, group)
    lin = Int4Linear(codes, scales, zeros, b)
    x = torch.randn(2, 5, cols)
    expected = torch.nn.functional.linear(x, dequantize_groups(codes, scales, zeros), b)
    got = lin(x)
    assert got.shape == (2, 5, out) and got.dtype == torch.float32
    # the kernel rounds activations to bfloat16 (2^-9 relative): the error stays at that level
    assert (got - expected).abs().max() <= 4e-3 * expected.abs().max()
    xb = x.to(torch.bfloat16)
    assert lin(xb).dtype == torch.bfloat16
    assert torch.allclose(lin(xb).float(), expected, atol=0.02 * expected.abs().max().item())


@needs_kernel
def test_int4_weight_reads_back_the_stored_weight_exactly():
    codes, scales, zeros = quantize_groups(torch.randn(40, 64), 32)  # 40 rows: padded to 48 inside
    assert torch.equal(Int4Linear(codes, scales, zeros).weight, dequantize_groups(codes, scales, zeros))


@needs_kernel
def test_chunked_repack_equals_one_whole_conversion():
    q = torch.randint(0, 16, (2048 + 80, 64), dtype=torch.int32)  # crosses chunk boundaries, odd tail
    whole = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(_kernel_layout(pack_nibbles(q)), whole)


def test_without_the_kernel_it_falls_back_to_a_dequantized_matmul(monkeypatch):
    monkeypatch.setattr(int4, "_INT4_KERNEL", False)
    codes, scales, zeros = quantize_groups(torch.randn(24, 64), 32)
    lin = Int4Linear(codes, scales, zeros)
    assert not lin.use_kernel
    x = torch.randn(3, 64)
    assert torch.allclose(lin(x), x @ dequantize_groups(codes, scales, zeros).T, atol=1e-5)
