"""Bad input, command by command: each case ends in exit code 2 with a message naming the offending field,
file or flag, and no traceback. Run in-process (main() returns or argparse exits), so a stray exception
fails the test instead of printing a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from edge_node.shard import write_shards
from edgefed.cli import main
from tests.checkpoints import copy_model

IDS = ["--prompt-ids", "5,6,7", "--max-new-tokens", "2", "--json"]


def run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    return code, err


def edit_config(model: Path, **changes) -> Path:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))
    return model


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def poison(model: Path, name: str) -> Path:
    tensors = load_file(model / "model.safetensors")
    tensors[name][0, 0] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return model


@pytest.fixture
def model(llama_dir, tmp_path) -> Path:
    return copy_model(llama_dir, tmp_path / "m")


GENERATE_CASES = {
    "config field of the wrong type": (lambda m: edit_config(m, hidden_size="big"), [], "'hidden_size' must be"),
    "config field a list": (lambda m: edit_config(m, intermediate_size=[1, 2]), [], "'intermediate_size'"),
    "rope_parameters a list": (lambda m: edit_config(m, rope_parameters=[1, 2]), [], "'rope_parameters'"),
    "zero attention heads": (lambda m: edit_config(m, num_attention_heads=0), [], "'num_attention_heads'"),
    "zero KV heads": (lambda m: edit_config(m, num_key_value_heads=0), [], "'num_key_value_heads'"),
    "eps not a number": (lambda m: edit_config(m, rms_norm_eps="tiny"), [], "'rms_norm_eps'"),
    "no config.json": (lambda m: (m / "config.json").unlink() or m, [], "config.json: file not found"),
    "generation_config not JSON": (lambda m: (m / "generation_config.json").write_text("{oops") or m, [],
                                   "generation_config.json: not valid JSON"),
    "eos id of the wrong type": (lambda m: edit_json(m / "generation_config.json", eos_token_id="two") or m, [],
                                 "'eos_token_id'"),
    "NaN in a weight": (lambda m: poison(m, "model.layers.1.mlp.up_proj.weight"), [],
                        "'model.layers.1.mlp.up_proj.weight' holds 1 NaN or Inf"),
    "negative threads": (lambda m: m, ["--threads", "-2"], "--threads: expected a positive integer"),
    "negative max-new-tokens": (lambda m: m, ["--max-new-tokens", "-1"], "--max-new-tokens: expected an integer"),
    "top-p out of range": (lambda m: m, ["--top-p", "1.5"], "--top-p: expected a number in (0, 1]"),
    "negative temperature": (lambda m: m, ["--temperature", "-1"], "--temperature: expected a number >= 0"),
    "negative logprobs": (lambda m: m, ["--logprobs", "-3"], "--logprobs: expected an integer >= 0"),
    "non-numeric ids": (lambda m: m, ["--prompt-ids", "5,x"], "--prompt-ids must be comma-separated integers"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_generate_names_what_is_wrong(case, model, capsys):
    breaks, extra, message = GENERATE_CASES[case]
    breaks(model)
    code, err = run(["generate", "--model", str(model), *IDS, *extra], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_temperature_zero_means_greedy(model, capsys):
    out = []
    for flags in (["--temperature", "0"], ["--temperature", "0", "--top-k", "50"], ["--greedy"]):
        assert main(["generate", "--model", str(model), "--prompt-ids", "5,6,7", "--max-new-tokens", "12",
                     "--json", *flags]) == 0
        out.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert out[0] == out[1] == out[2]


SHARD_CASES = {
    "non-empty out": (lambda m, o: (o.mkdir(), (o / "old.txt").write_text("x")), "exists and is not empty"),
    "out is a file": (lambda m, o: o.write_text("x"), "is a file, not a directory"),
    "out under a file": (lambda m, o: o.write_text("x"), "a parent of it is a file"),
    "out is the model": (None, "is the model directory itself"),
}


@pytest.mark.parametrize("case", sorted(SHARD_CASES))
def test_shard_refuses_a_bad_output_directory(case, model, tmp_path, capsys):
    prepare, message = SHARD_CASES[case]
    out = tmp_path / "out"
    if prepare:
        prepare(model, out)
    target = {"out under a file": out / "inner", "out is the model": model}.get(case, out)
    code, err = run(["shard", "--model", str(model), "--nodes", "2", "--out", str(target)], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_shard_force_replaces_stale_shards(model, tmp_path, capsys):
    assert run(["shard", "--model", str(model), "--nodes", "2", "--out", str(tmp_path / "s")], capsys)[0] == 0
    assert run(["shard", "--model", str(model), "--nodes", "1", "--out", str(tmp_path / "s"), "--force"],
               capsys)[0] == 0
    assert not (tmp_path / "s" / "rank1").exists()  # no stale rank beside the new 1-node manifest


@pytest.fixture(scope="module")
def shards(llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "s"
    write_shards(llama_dir, out, 2)
    return out


def _manifest(shards: Path, tmp_path: Path, **changes) -> Path:
    s = tmp_path / "s"
    shutil.copytree(shards, s)
    edit_json(s / "manifest.json", **changes)
    return s


TP_CASES = {
    "nodes edited to 1": (dict(nodes=1), "inconsistent 'nodes', 'ratios' and 'plan'"),
    "plan edited": (dict(ratios=[3, 1]), "does not match 'nodes' = 2"),
    "no files": (dict(files=None), "field 'files' is missing"),
    "unknown weights": (dict(weights="int3"), "field 'weights' is 'int3'"),
    "wrong format": (dict(format="other/9"), "format 'other/9'"),
}


@pytest.mark.parametrize("case", sorted(TP_CASES))
def test_tp_generate_checks_the_manifest(case, shards, tmp_path, capsys):
    changes, message = TP_CASES[case]
    s = _manifest(shards, tmp_path, **changes)
    code, err = run(["tp-generate", "--shards", str(s), *IDS], capsys)
    assert code == 2 and message in err and "manifest.json" in err and "Traceback" not in err, err


def test_tp_generate_names_a_shard_file_of_the_wrong_size(shards, tmp_path, capsys):
    s = _manifest(shards, tmp_path)
    victim = s / "rank1" / "layer0001.safetensors"
    victim.write_bytes(victim.read_bytes()[:-4])
    code, err = run(["tp-generate", "--shards", str(s), *IDS], capsys)
    assert code == 2 and "rank1/layer0001.safetensors" in err and "the manifest says" in err, err


@pytest.mark.parametrize("flags, message", [
    (["--window", "0"], "--window: expected a positive integer"),
    (["--memory-mb", "-5"], "--memory-mb: expected a positive number"),
    (["--timeout", "0"], "--timeout: expected a positive number"),
])
def test_tp_generate_checks_its_flags(flags, message, shards, capsys):
    code, err = run(["tp-generate", "--shards", str(shards), *IDS, *flags], capsys)
    assert code == 2 and message in err, err


@pytest.mark.parametrize("flags, message", [
    (["--groups", "0"], "--groups: expected a positive integer"),
    (["--groups", "9"], "--groups 9 exceeds the model's 4 layers"),
    (["--context", "48"], "--context 48 must be a multiple of --chunk 32"),
    (["--context", "4096"], "exceeds the model's max_position_embeddings"),
])
def test_prefill_checks_groups_and_context_before_exporting(flags, message, model, tmp_path, capsys):
    code, err = run(["prefill", "--model", str(model), "--chunk", "32", "--prompt-ids", "5,6,7",
                     "--graph-dir", str(tmp_path / "g"), *flags], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "g").exists()


def test_prefill_names_a_prompt_file_that_is_a_directory(model, tmp_path, capsys):
    code, err = run(["prefill", "--model", str(model), "--prompt-file", str(tmp_path)], capsys)
    assert code == 2 and str(tmp_path) in err and "Traceback" not in err, err
