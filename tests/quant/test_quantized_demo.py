"""Quantized checkpoints of the trained demo model against its float weights, on held-out text: top-1 agreement,
perplexity, greedy continuations of code prompts, and `edgefed generate` on the quantized directory."""

from __future__ import annotations

import json

import pytest
import torch

from edge_node.model import SamplingConfig, Tokenizer, generate
from edgefed.cli import main
from quant.checkpoint import load_any
from quant.quantize import quantize_checkpoint
from tests.quant.test_int8_agreement import DEMO, heldout_windows

pytestmark = pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="models/edgefed-demo not built")
PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef main():", "class Stack:\n    def __init__(self):",
           "for i in range(10):", "try:\n    import json\nexcept ImportError:"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("demo-q")
    for weights in ("int8", "int4"):  # int4 with the default group size, 32
        quantize_checkpoint(DEMO, root / weights, weights)
    return {"float": DEMO, "int8": root / "int8", "int4": root / "int4"}


def scores(model_dir, windows: list[list[int]]) -> tuple[torch.Tensor, float]:
    """Top-1 ids at every position of the windows, and the perplexity of their next tokens."""
    model = load_any(model_dir, pack=True)
    tops, nll = [], []
    with torch.inference_mode():
        for w in windows:
            logits = model(torch.tensor([w]), model.new_cache())[0].float()  # (S, vocab)
            tops.append(logits.argmax(-1))
            nll.append(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(w[1:]), reduction="none"))
    return torch.cat(tops), torch.cat(nll).mean().exp().item()


def test_top1_agreement_and_perplexity_on_heldout_text(quantized):
    windows = heldout_windows(DEMO)
    results = {k: scores(d, windows) for k, d in quantized.items()}
    ref, ppl = results["float"]
    agreement = {k: (tops == ref).float().mean().item() for k, (tops, _) in results.items()}
    print("edgefed-demo, 4096 held-out tokens: " + ", ".join(
        f"{k} top-1 agreement {agreement[k]:.4f} perplexity {p:.3f}" for k, (_, p) in results.items()))
    assert agreement["int8"] >= 0.99  # measured 0.9978
    assert agreement["int4"] >= 0.95  # measured 0.9717
    for k in ("int8", "int4"):
        assert results[k][1] <= ppl * 1.01  # measured +0.0% and +0.04%


def test_int8_greedy_continuations_equal_float(quantized):
    tok = Tokenizer.from_dir(DEMO)
    ref, int8 = load_any(DEMO, pack=True), load_any(quantized["int8"], pack=True)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        assert generate(int8, ids, 32, SamplingConfig()).token_ids == generate(ref, ids, 32).token_ids, prompt


def test_generate_command_on_a_quantized_demo_model(quantized, capsys):
    argv = ["generate", "--prompt", "def fibonacci(n):", "--max-new-tokens", "24", "--json", "--threads", "2"]
    assert main([*argv, "--model", str(DEMO)]) == 0
    want = json.loads(capsys.readouterr().out)
    assert main([*argv, "--model", str(quantized["int8"])]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"]
    assert main([*argv, "--model", str(quantized["int4"])]) == 0
    assert json.loads(capsys.readouterr().out)["text"].strip()
