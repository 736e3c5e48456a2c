"""`edgefed generate`: the JSON contract, the repetition-penalty flag, and errors on stderr with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tokenizers import Tokenizer

from edge_node.model import SamplingConfig, generate, load_model
from tests.checkpoints import copy_model


def edgefed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgefed", *args], capture_output=True, text=True, timeout=120)


def test_json_output_has_exactly_the_promised_keys_and_greedy_ids(llama_dir):
    r = edgefed("generate", "--model", str(llama_dir), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "8",
                "--greedy", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"token_ids", "text", "ttft_ms", "tpot_ms", "peak_rss_mb"} <= set(out)
    assert out["token_ids"] == generate(load_model(llama_dir), [5, 6, 7, 8], 8).token_ids
    assert out["ttft_ms"] > 0 and out["tpot_ms"] > 0 and out["peak_rss_mb"] > 10


def test_prefill_on_onnx_runtime_gives_the_same_greedy_tokens_and_reports_the_provider(llama_dir):
    prompt = ",".join(str(5 + i % 50) for i in range(40))  # 40 tokens: two chunks of 32, the last padded
    r = edgefed("generate", "--model", str(llama_dir), "--prompt-ids", prompt, "--max-new-tokens", "12",
                "--greedy", "--prefill", "ort", "--chunk", "32", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    expected = generate(load_model(llama_dir), [int(t) for t in prompt.split(",")], 12).token_ids
    assert out["token_ids"] == expected
    assert out["prefill"] == "ort" and out["prefill_provider"] == "CPUExecutionProvider" and out["prefill_ms"] > 0


def test_generation_configs_repetition_penalty_is_the_default_and_the_flag_overrides_it(llama_dir, tmp_path):
    model_dir = copy_model(llama_dir, tmp_path / "m")
    (model_dir / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.5}))
    args = ("generate", "--model", str(model_dir), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "16", "--json")
    model = load_model(model_dir)
    penalised = generate(model, [5, 6, 7, 8], 16, SamplingConfig(repetition_penalty=1.5)).token_ids
    plain = generate(model, [5, 6, 7, 8], 16).token_ids
    assert penalised != plain
    assert json.loads(edgefed(*args).stdout)["token_ids"] == penalised
    assert json.loads(edgefed(*args, "--repetition-penalty", "1").stdout)["token_ids"] == plain


def test_text_prompt_uses_the_models_tokenizer(llama_dir, tmp_path):
    model_dir = copy_model(llama_dir, tmp_path / "m", char_tokenizer=True)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    r = edgefed("generate", "--model", str(model_dir), "--prompt", "hello", "--max-new-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    expected = generate(load_model(model_dir), tok.encode("hello").ids, 5).token_ids
    assert out["token_ids"] == expected and out["text"] == tok.decode(expected)


def test_eos_stops_generation(llama_dir):
    model = load_model(llama_dir)
    first = generate(model, [5, 6, 7], 1).token_ids[0]
    result = generate(model, [5, 6, 7], 10, eos_ids=[first])
    assert result.token_ids == [first] and result.stop_reason == "eos"


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent", "--prompt-ids", "1"], "config.json: file not found"),
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    (["--prompt", "hi"], "tokenizer.json: file not found"),
    (["--prompt-ids", ""], "empty"),
])
def test_errors_go_to_stderr_with_nonzero_exit(llama_dir, args, message):
    if "--model" not in args:
        args = ["--model", str(llama_dir), *args]
    r = edgefed("generate", *args, "--json")
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_logprobs_are_the_reference_models_at_every_generated_position(tmp_path, capsys):
    """--logprobs K reports, per generated token, its log-probability and the top K: the same numbers
    transformers gives on the same checkpoint (realistic scale, so an error would show)."""
    import torch

    from tests.parity import realistic_checkpoint

    hf = realistic_checkpoint(tmp_path / "m", eos_token_id=None)
    prompt = [5, 0, 17, 42, 7, 99, 3, 0]
    from edgefed.cli import main  # in-process: the CLI path without a second interpreter's start-up

    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt-ids", ",".join(map(str, prompt)),
                 "--max-new-tokens", "6", "--logprobs", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ids = prompt + out["token_ids"]
    with torch.no_grad():
        x = torch.tensor([ids])
        ref = torch.log_softmax(hf(x, attention_mask=torch.ones_like(x)).logits[0].float(), dim=-1)
    assert len(out["logprobs"]) == 6
    for i, entry in enumerate(out["logprobs"]):
        row = ref[len(prompt) - 1 + i]
        top = torch.topk(row, 3)
        assert entry["token_id"] == out["token_ids"][i] == top.indices[0].item()
        assert abs(entry["logprob"] - row[entry["token_id"]].item()) < 1e-4
        assert [t["token_id"] for t in entry["top_logprobs"]] == top.indices.tolist()
        got = [t["logprob"] for t in entry["top_logprobs"]]
        assert max(abs(a - b) for a, b in zip(got, top.values.tolist(), strict=True)) < 1e-4
