"""The committed demo model runs in edgefed exactly as in transformers, and generates plausible Python."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edge_node.model import SamplingConfig, Tokenizer, generate, load_model

DEMO = Path(__file__).resolve().parents[2] / "models" / "edgefed-demo"


@pytest.fixture(scope="module")
def reference():
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()


@pytest.mark.parametrize("pack", [False, True])
def test_demo_model_logits_match_transformers(reference, pack):
    tok = Tokenizer.from_dir(DEMO)
    ids = torch.tensor([tok.encode("import os\n\ndef read_config(path):\n    with open(path) as f:\n")])
    with torch.no_grad():
        expected = reference(ids).logits
    model = load_model(DEMO, pack=pack)
    assert (model(ids, model.new_cache()) - expected).abs().max() < 1e-4


def test_demo_model_greedy_matches_transformers_and_looks_like_python(reference):
    # transformers' generate applies generation_config.json's repetition penalty by default; so does the CLI.
    penalty = json.loads((DEMO / "generation_config.json").read_text())["repetition_penalty"]
    tok = Tokenizer.from_dir(DEMO)
    prompt = tok.encode("def fibonacci(n):")
    expected = reference.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    got = generate(load_model(DEMO, pack=True), prompt, 48, SamplingConfig(repetition_penalty=penalty)).token_ids
    assert got == expected
    text = tok.decode(got)
    assert "\n" in text and any(word in text for word in ("return", "if ", "for ", "=", "(")), text
    words = text.replace("(", " ").replace(",", " ").split()
    assert max(words.count(w) for w in set(words)) <= 4, text  # no "name, name, name, ..." loop
    assert text.strip() in (DEMO / "MODEL_CARD.md").read_text()  # the card shows what the model really writes
