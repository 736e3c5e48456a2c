"""The demo-model builder is reproducible, and the committed model and tokenizer run in edgefed."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

from edge_node.model import Tokenizer, load_model
from edgefed.cli import main
from emulation import corpus
from emulation.demo_model import (
    DEFAULT_SPEC,
    EOT,
    OUTPUT_FILES,
    TINY_SPEC,
    build_demo_model,
    default_model_dir,
    lr_at,
)

transformers = pytest.importorskip("transformers")

DEMO = default_model_dir()


def test_default_model_dir_is_the_committed_one():
    assert DEMO.parts[-2:] == ("models", "edgefed-demo")
    assert (DEMO / "config.json").is_file(), "run: edgefed build-demo-model (see MODEL_CARD.md)"


def test_committed_model_directory_is_complete_and_small():
    assert sorted(p.name for p in DEMO.iterdir()) == sorted(OUTPUT_FILES)
    assert sum(p.stat().st_size for p in DEMO.iterdir()) <= 16 * 1024 * 1024
    config = json.loads((DEMO / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "bfloat16"
    assert config["bos_token_id"] == config["eos_token_id"] == 0
    card = (DEMO / "MODEL_CARD.md").read_text()
    assert "PSF License Agreement" in card and "edgefed build-demo-model" in card


def stored_parameters(model_dir) -> int:
    """Parameters stored in model.safetensors, read from its header (tied embeddings are stored once)."""
    with open(model_dir / "model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")


def test_committed_model_runs_in_edgefed_on_python_source():
    assert 5_000_000 <= stored_parameters(DEMO) <= 15_000_000
    tok = Tokenizer.from_dir(DEMO)
    ids = tok.encode("def add(a, b):\n    return a + b\n")
    model = load_model(DEMO)
    logits = model(torch.tensor([ids]), model.new_cache())
    assert logits.shape == (1, len(ids), model.config.vocab_size) == (1, len(ids), tok.inner.get_vocab_size())
    assert torch.isfinite(logits).all()


def test_committed_tokenizer_round_trips_python_source_in_edgefed():
    tok = Tokenizer.from_dir(DEMO)
    assert tok.bos_token == tok.eos_token == EOT
    eot = tok.token_id(EOT)
    samples = [corpus.read_source(path) for path in corpus.corpus_files("heldout")[:5]]
    samples.append("x = {'a': 1 , }\n\tif  y :  pass  # ünïcode ☃ \r\n")
    for text in samples:
        ids = tok.encode(text)  # as `edgefed generate --prompt` encodes
        # No BOS: with BOS == PAD, transformers' generate() would mask a leading BOS out.
        assert eot not in ids
        assert tok.decode(ids) == text


def test_edgefed_tokenizer_agrees_with_transformers():
    text = "class Spam(Eggs):\n    def __init__(self):\n        super().__init__()\n"
    ours, reference = Tokenizer.from_dir(DEMO), transformers.AutoTokenizer.from_pretrained(DEMO)
    ids = reference(text).input_ids
    assert ours.encode(text) == ids
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True) == text


def test_tiny_build_is_byte_identical_for_the_same_seed(tmp_path):
    first = build_demo_model(tmp_path / "a", TINY_SPEC, minutes=None, steps=3, seed=7, threads=1, progress=False)
    build_demo_model(tmp_path / "b", TINY_SPEC, minutes=None, steps=3, seed=7, threads=1, progress=False)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(OUTPUT_FILES)
    assert first.steps == first.schedule_steps == 3
    assert first.tokens_seen == 3 * TINY_SPEC.batch_size * TINY_SPEC.seq_len
    assert math.isfinite(first.heldout_loss)
    card = (tmp_path / "a" / "MODEL_CARD.md").read_text()
    assert "--preset tiny --seed 7 --steps 3 --minutes 0 --threads 1" in card


def test_tiny_build_loads_in_transformers(tmp_path):
    build_demo_model(tmp_path, TINY_SPEC, minutes=None, steps=1, seed=0, threads=1, progress=False)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.vocab_size == len(tokenizer) == TINY_SPEC.vocab_size
    assert model.dtype == torch.bfloat16


def test_cli_refuses_a_directory_with_foreign_files(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["build-demo-model", "--out", str(tmp_path), "--preset", "tiny", "--steps", "1", "--quiet"]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_needs_steps_or_a_time_budget(tmp_path, capsys):
    assert main(["build-demo-model", "--out", str(tmp_path / "m"), "--minutes", "0", "--quiet"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_learning_rate_warms_up_then_decays_to_the_floor():
    spec = DEFAULT_SPEC
    rates = [lr_at(step, 200, spec) for step in range(201)]
    warm = rates[: spec.warmup_steps]
    assert warm == sorted(warm) and rates[spec.warmup_steps - 1] == pytest.approx(spec.lr)
    assert rates[spec.warmup_steps :] == sorted(rates[spec.warmup_steps :], reverse=True)
    assert rates[-1] == pytest.approx(spec.lr * spec.min_lr_ratio)
    # Warmup does not depend on the schedule length: what makes time-budgeted builds reproducible.
    assert [lr_at(s, 50, spec) for s in range(spec.warmup_steps)] == warm
