"""The exit heads shipped beside the demo model (models/edgefed-demo-exits, made by `edgefed train-exits`; the
testbed's default scenario deploys them): they load against the demo model, are small, and on held-out text
(stdlib files neither the model nor the heads were trained on) agree with the full model's top-1 more often
than the untrained head (the logit lens: final norm + lm_head on the same hidden state)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "edgefed-demo"
EXITS = ROOT / "models" / "edgefed-demo-exits" / "exits.json"


def test_shipped_exit_heads_load_and_beat_the_untrained_head_on_held_out_text():
    if not (DEMO / "model.safetensors").is_file():
        pytest.skip(f"needs the demo model at {DEMO}")
    from edge_node.early_exit import ExitHeads, load_exit_heads
    from edge_node.exit_train import agreement, collect_hidden, token_chunks
    from edge_node.model import Tokenizer, load_model
    from emulation.corpus import corpus_files

    files = corpus_files("heldout")
    if not files:
        pytest.skip("no held-out stdlib files on this Python")
    assert EXITS.with_suffix(".safetensors").stat().st_size < 400_000  # a few hundred KB at most, in the repo
    model = load_model(DEMO)
    heads = load_exit_heads(EXITS, model.config)  # checks sizes, layers and the weights' sha256
    assert heads.layers == (4,) and heads.meta["trained"]["rows"] >= 4096
    tok = Tokenizer.from_dir(DEMO)
    chunks = token_chunks((p.read_text(encoding="utf-8") for p in files),
                          lambda t: tok.encode(t, add_special_tokens=False), 256, 2048)
    cache = collect_hidden(model, chunks, heads.layers)
    assert cache.rows == 2048
    untrained = agreement(model, ExitHeads.untrained(model.config, heads.layers, model.norm.weight, adapter=False),
                          cache)[4]
    trained = agreement(model, heads, cache)[4]
    # measured: 50.8% untrained -> 72.9% trained on these 2048 held-out tokens
    assert trained > untrained + 0.08, (untrained, trained)
