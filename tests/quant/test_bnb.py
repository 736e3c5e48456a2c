"""bitsandbytes bases on the CPU: nf4 and int8 load, and nf4 LoRA gradients stay exact after an evaluation pass
(bitsandbytes 0.50.2 would otherwise repack the weights for a bf16 kernel without autograd)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # importing bitsandbytes alone takes ~7 s (it imports torch._dynamo)
DEMO = Path(__file__).resolve().parents[2] / "models" / "edgefed-demo"


def lora_grads(evaluate_first: bool) -> dict[str, torch.Tensor]:
    from federated import models
    from quant.bnb import load_base

    base = load_base(DEMO, "nf4")
    torch.manual_seed(1)  # the same LoRA init in both models
    model = models.attach(base, 4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    x = torch.randint(0, 8000, (2, 16), generator=torch.Generator().manual_seed(0))
    if evaluate_first:
        model.eval()
        with torch.no_grad():
            model(input_ids=x)
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_nf4_lora_gradients_are_exact_after_an_evaluation_pass():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after_eval = lora_grads(evaluate_first=True)
    assert not [w for w in caught if "autograd kernel" in str(w.message)]
    fresh = lora_grads(evaluate_first=False)
    first = next(n for n in fresh if ".layers.0." in n and "lora_A" in n)  # reached only through the frozen base
    assert fresh[first].abs().sum() > 0
    for n in fresh:
        torch.testing.assert_close(after_eval[n], fresh[n])


@pytest.mark.parametrize("quant, kind", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_bases_load_on_the_cpu(quant, kind):
    from quant.bnb import load_base

    model = load_base(DEMO, quant)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == kind
    assert not any(p.requires_grad for p in model.parameters())
