"""`edgefed train-exits` and `edgefed generate --exits`: heads written beside the model, off = the full model,
a missing cloud tier = the edge alone, said so."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edge_node.early_exit import load_exit_heads
from edge_node.model import generate, load_model
from edge_node.model.config import ModelConfig
from tests.checkpoints import copy_model


def edgefed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgefed", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def char_model(llama_dir, tmp_path_factory):
    return copy_model(llama_dir, tmp_path_factory.mktemp("m") / "model", char_tokenizer=True)


@pytest.mark.slow
def test_train_exits_then_generate_with_them(char_model, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("def add(a, b):\n    return a + b\n" * 40)
    r = edgefed("train-exits", "--model", str(char_model), "--layers", "1,2", "--data", str(data),
                "--tokens", "512", "--seq-len", "128", "--steps", "5", "--batch", "64", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] == 512 and set(out["train_top1"]) == {"1", "2"}
    assert "distilling" in r.stderr  # the progress bar
    heads = load_exit_heads(char_model, ModelConfig.from_dir(char_model))
    assert heads.layers == (1, 2) and heads.meta["trained"]["steps"] == 5
    expected = generate(load_model(char_model), [5, 6, 7, 8], 10).token_ids
    # a threshold no probability exceeds: every head consulted, none taken
    r = edgefed("generate", "--model", str(char_model), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "10",
                "--exits", "auto", "--threshold", "1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["token_ids"] == expected and out["usage"] == {"edge@4": 10} and out["exits"]["layers"] == [1, 2]
    r = edgefed("generate", "--model", str(char_model), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6",
                "--exits", "auto", "--threshold", "0", "--json")
    assert json.loads(r.stdout)["usage"] == {"edge@1": 6}
    # collaborative with no cloud listening: the edge answers alone at k and says why
    r = edgefed("generate", "--model", str(char_model), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6",
                "--exits", "auto", "--threshold", "1", "--exit-mode", "collaborative", "--cloud", "127.0.0.1:9",
                "--cloud-timeout", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["cloud"] == "unreachable" and out["usage"] == {"edge-fallback@2": 6}


@pytest.mark.slow
def test_bad_exit_flags_are_named_errors(char_model, tmp_path):
    r = edgefed("generate", "--model", str(char_model), "--prompt-ids", "5,6", "--exits", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "no exit heads here" in r.stderr and "Traceback" not in r.stderr
    r = edgefed("generate", "--model", str(char_model), "--prompt-ids", "5,6", "--exit-mode", "collaborative")
    assert r.returncode == 2 and "--cloud HOST:PORT" in r.stderr
    r = edgefed("train-exits", "--model", str(char_model), "--layers", "0,9")
    assert r.returncode == 2 and "exit layers must be in [1, 4)" in r.stderr
