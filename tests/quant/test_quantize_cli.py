"""`edgefed quantize` and quantized checkpoints from the command line: bad input ends in exit code 2 with a
named error (the flag, tensor or file) and no traceback; `edgefed generate` runs a quantized directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgefed.cli import main
from tests.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("float")
    make_checkpoint(path, tie=True)
    return path


@pytest.fixture(scope="module")
def int4_dir(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "int4"
    assert main(["quantize", "--model", str(model), "--weights", "int4", "--group-size", "32", "--out", str(out)]) == 0
    return out


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def quantize(model: Path, out: Path, *flags: str) -> list[str]:
    return ["quantize", "--model", str(model), "--out", str(out), *flags]


@pytest.mark.parametrize("flags,message", [
    (["--weights", "int3"], "--weights must be one of int8, int4, got 'int3'"),
    (["--weights", "int4", "--group-size", "64"],
     "group size 64 does not divide in_features 160 of tensor 'model.layers.0.mlp.down_proj.weight'"),
    (["--weights", "int4", "--group-size", "48"], "--group-size must be one of 32, 64, 128, 256"),
    (["--weights", "int8", "--group-size", "48"], "--group-size must be one of 32, 64, 128, 256 or -1 (one scale per "
                                                  "output row) for int8, got 48"),
    (["--weights", "int8", "--group-size", "64"],
     "group size 64 does not divide in_features 160 of tensor 'model.layers.0.mlp.down_proj.weight': use "
     "--group-size 32 or -1"),
    (["--weights", "int8", "--lm-head", "int4"], "--lm-head must be float, int8 or (with --weights int4) int4"),
])
def test_bad_quantize_flags_are_named(model, tmp_path, capsys, flags, message):
    code, _, err = run(quantize(model, tmp_path / "q", *flags), capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()  # refused before writing anything


def test_out_must_be_new_or_forced_and_not_the_model(model, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run(quantize(model, out, "--weights", "int8"), capsys)
    assert code == 2 and "exists and is not empty" in err and "--force" in err
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")  # would be read as weights: removed
    assert run(quantize(model, out, "--weights", "int8", "--force"), capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "notes.txt"]
    code, _, err = run(quantize(model, model, "--weights", "int8"), capsys)
    assert code == 2 and "is the model directory itself" in err


def test_a_quantized_checkpoint_is_not_quantized_again(int4_dir, tmp_path, capsys):
    code, _, err = run(quantize(int4_dir, tmp_path / "qq", "--weights", "int8"), capsys)
    assert code == 2 and "already quantized" in err


def test_generate_runs_a_quantized_directory(model, int4_dir, tmp_path, capsys):
    argv = ["generate", "--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--json"]
    code, out, _ = run([*argv, "--model", str(int4_dir)], capsys)
    assert code == 0
    result = json.loads(out)
    assert len(result["token_ids"]) == 6 and result["stop_reason"] == "length"
    int8 = tmp_path / "int8"
    assert run(quantize(model, int8, "--weights", "int8", "--lm-head", "int8", "--json"), capsys)[0] == 0
    code, out, _ = run([*argv, "--model", str(int8), "--dtype", "bfloat16"], capsys)
    assert code == 0 and len(json.loads(out)["token_ids"]) == 6


def broken_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight_zero"),
     "missing tensor(s) of an int4 checkpoint: model.layers.1.mlp.up_proj.weight_zero"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight_scale":
                         t["model.layers.0.self_attn.k_proj.weight_scale"].float()}),
     "tensor 'model.layers.0.self_attn.k_proj.weight_scale' is F32, an int4 checkpoint stores it as BF16"),
    (lambda t: t.update({"model.layers.0.mlp.down_proj.weight": t["model.layers.0.mlp.down_proj.weight"][:, :40]
                         .clone()}),
     "tensor 'model.layers.0.mlp.down_proj.weight' has shape [64, 40]"),
    (lambda t: t.update({"model.layers.0.extra.weight_scale": torch.ones(3)}),
     "unexpected tensor(s) in an int4 checkpoint: model.layers.0.extra.weight_scale"),
])
def test_a_broken_quantized_checkpoint_is_named_before_weights_are_read(int4_dir, tmp_path, capsys, edit, message):
    broken = broken_copy(int4_dir, tmp_path / "broken", edit)
    code, _, err = run(["generate", "--model", str(broken), "--prompt-ids", "5,6", "--max-new-tokens", "2"], capsys)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("change,message", [
    ({"quant_method": "gptq"}, "quant_method 'gptq' is not 'edgefed'"),
    ({"format": 2}, "format 2, expected 1"),
    ({"group_size": 16}, "group_size 16 for int4"),
    ({"weights": "int2"}, "weights 'int2', expected one of int8, int4"),
])
def test_a_foreign_or_newer_quantization_config_is_refused(int4_dir, tmp_path, capsys, change, message):
    bad = tmp_path / "bad"
    shutil.copytree(int4_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (bad / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(["generate", "--model", str(bad), "--prompt-ids", "5,6", "--max-new-tokens", "2"], capsys)
    assert code == 2 and message in err and "quantization_config" in err
