"""The command line itself: no torch until a command runs, and errors named instead of empty successes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from edge_node.model.decode import decode_loop
from edge_node.model.errors import NonFiniteError
from edge_node.model.sampling import Sampler, SamplingConfig
from edgefed.cli import main
from tests.checkpoints import copy_model


def test_building_the_parser_loads_neither_torch_nor_onnxruntime():
    code = ("import sys; from edgefed.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_agent_daemons_start_up_path_loads_no_torch():
    # what `edgefed node` runs before its command: the malloc setting, the parser, the agent module
    code = ("import sys; from edgefed.cli import _return_freed_memory, build_parser; _return_freed_memory(); "
            "build_parser(); import edge_node.agent; print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_the_demo_model_commands_defaults_are_the_builders():
    from edgefed.commands import build_demo_model as cmd
    from emulation import demo_model

    assert cmd.DEFAULT_MINUTES == demo_model.DEFAULT_MINUTES
    assert set(cmd.PRESETS) == set(demo_model.PRESETS)


def test_logits_that_turn_non_finite_stop_generation_with_an_error():
    calls = []

    def step(ids, pos0):
        calls.append(pos0)
        return torch.full((8,), float("nan")) if len(calls) == 3 else torch.arange(8.0)

    with pytest.raises(NonFiniteError, match="not finite .* after 2 generated token"):
        decode_loop(step, [1, 2], 10, Sampler(SamplingConfig()), (), 100)


def test_an_overflowing_model_is_an_error_not_an_empty_success(llama_dir, tmp_path, capsys):
    model = copy_model(llama_dir, tmp_path / "m")
    tensors = load_file(model / "model.safetensors")
    tensors["lm_head.weight"][:] = 3e38  # finite, but every logit overflows to inf
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    code = main(["generate", "--model", str(model), "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--json"])
    captured = capsys.readouterr()
    assert code == 2 and "not finite" in captured.err and "Traceback" not in captured.err
    assert not captured.out.strip() or "token_ids" not in json.loads(captured.out)


def test_prefill_takes_a_quantized_directory(llama_dir, tmp_path, capsys):
    assert main(["quantize", "--model", str(llama_dir), "--weights", "int8", "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert main(["prefill", "--model", str(tmp_path / "q"), "--chunk", "32", "--prompt-ids", "5,6,7,8,9",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["provider"] == "CPUExecutionProvider" and out["prompt_tokens"] == 5
