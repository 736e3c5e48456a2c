"""Hidden-state transfer codec: float32 exact, float16 and int8 (per-token scale) within their error, sizes, errors."""

from __future__ import annotations

import pytest
import torch

from quant.codec import CodecError, Encoded, decode, encode


def states(rows: int = 16, cols: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=g)
    return x * torch.logspace(-2, 2, rows)[:, None]  # tokens of very different scales


def test_float32_is_exact_and_float16_halves_the_bytes():
    x = states()
    assert torch.equal(decode(encode(x, "float32")), x)
    enc = encode(x, "float16")
    assert enc.nbytes == x.numel() * 2
    assert torch.equal(decode(enc), x.half().float())


def test_int8_keeps_each_tokens_scale():
    x = states()
    enc = encode(x, "int8")
    assert enc.nbytes == x.numel() + 4 * x.shape[0]  # codes + one float32 scale per token
    err = (decode(enc) - x).abs().amax(dim=1)
    assert (err <= x.abs().amax(dim=1) / 127 * 0.5 + 1e-6).all()  # half a step of that token's own scale


def test_empty_and_zero_rows_round_trip():
    assert decode(encode(torch.empty(0, 8), "int8")).shape == (0, 8)
    assert torch.equal(decode(encode(torch.zeros(2, 8), "int8")), torch.zeros(2, 8))


def test_bad_payloads_are_named_errors():
    with pytest.raises(CodecError, match="unknown hidden-state codec 'bf8'"):
        encode(states(), "bf8")
    with pytest.raises(CodecError, match="NaN or Inf"):
        encode(torch.tensor([[float("nan"), 1.0]]), "float16")
    enc = encode(states(2, 8), "int8")
    with pytest.raises(CodecError, match="field 'scales' holds 4 bytes"):
        decode(Encoded("int8", 2, 8, enc.data, enc.scales[:4]))
    with pytest.raises(CodecError, match="field 'data'"):
        decode(Encoded("float16", 2, 8, b"\0" * 7))
    with pytest.raises(CodecError, match="tokens, hidden"):
        encode(torch.zeros(8), "float16")
