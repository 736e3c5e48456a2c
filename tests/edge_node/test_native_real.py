"""The packed decode step on the real model: int8 (group 32, float16 scales) and int4 checkpoints of
SmolLM2-135M-Instruct, fed held-out text one token at a time through the native step (each product's input in two
int8 levels), keep the top-1 agreement with float32 the issue asks of them (int8 >= 99%, int4 >= 95%)."""

from __future__ import annotations

import pytest
import torch

from edge_node.model import native
from tests.quant.test_int8_agreement import REAL, heldout_windows

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (REAL / "config.json").is_file(),
                                 reason="real model absent: run `make real-model`"),
              pytest.mark.skipif(not native.packs(16, 64, 32), reason="no AVX512-VNNI here: nothing is packed")]


def test_packed_int8_and_int4_decode_steps_keep_their_agreement_on_the_real_model(tmp_path):
    from quant.checkpoint import load_any
    from quant.quantize import quantize_checkpoint

    window = heldout_windows(REAL, tokens=320, size=320)[0]
    float_model = load_any(REAL, pack=True)
    with torch.inference_mode():
        ref = float_model(torch.tensor([window]), float_model.new_cache())[0].argmax(-1)
    del float_model
    agree = {}
    for weights, floor, kw in (("int8", 0.99, dict(scale_dtype="float16")), ("int4", 0.95, {})):
        quantize_checkpoint(REAL, tmp_path / weights, weights, 32, lm_head="int8", **kw)
        model = load_any(tmp_path / weights, pack=True)
        assert model.blocks["0"].mlp.w13.native_weight().kind in (native.Q8P, native.Q4P)
        dec, cache = native.NativeDecoder.of(model), model.new_cache()
        with torch.inference_mode():
            tops = torch.stack([dec.step(t, pos, cache).argmax() for pos, t in enumerate(window)])
        agree[weights] = (tops == ref).float().mean().item()
        assert agree[weights] >= floor, f"{weights}: top-1 {agree[weights]:.4f} over {len(window)} positions"
    print(f"packed decode top-1 agreement with float32 (SmolLM2-135M-Instruct, 320 held-out tokens): {agree}")
