"""`edgefed prefill`: one JSON line with speed, provider and error against float torch; clear failures."""

import json

from edgefed.cli import main
from tests.npu_backends.conftest import prompt_of


def _ids(n):
    return ",".join(map(str, prompt_of(n, seed=9)))


def _int8_recipe_run(llama_dir, capsys, graph_dir, flag: str) -> tuple[list[str], dict, dict]:
    """`edgefed prefill --int8 <flag>` on 70 ids into graph_dir: (its argv, its JSON, the recipe graphs.json
    records for the mode)."""
    argv = ["prefill", "--model", str(llama_dir), "--chunk", "32", "--prompt-ids", _ids(70), "--json", "--int8",
            flag, "--graph-dir", str(graph_dir)]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["int8"] == flag.removeprefix("--")
    return argv, out, json.loads((graph_dir / "graphs.json").read_text())["int8"][out["int8"]]


def test_ort_prefill_reports_speed_provider_and_error(llama_dir, capsys):
    assert main(["prefill", "--model", str(llama_dir), "--chunk", "32", "--prompt-ids", _ids(40), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["provider"] == "CPUExecutionProvider" and out["chunks"] == 2 and out["context"] == 64
    assert out["max_abs_logit_error"] < 1e-4 and out["top1_agree"] is True
    assert out["prefill_tokens_per_s"] > 0 and out["ttft_ms"] > 0


def test_int8_shadow_out_of_order_runs(llama_dir, capsys, tmp_path):
    argv = ["prefill", "--model", str(llama_dir), "--chunk", "32", "--prompt-ids", _ids(70), "--json", "--int8",
            "--shadow", "--groups", "2", "--out-of-order", "--graph-dir", str(tmp_path)]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["int8"] == "shadow" and out["providers"] == ["CPUExecutionProvider"] * 2
    assert out["max_abs_logit_error"] < 0.5


def test_strict_with_an_absent_provider_exits_2_naming_it(llama_dir, capsys):
    argv = ["prefill", "--model", str(llama_dir), "--chunk", "32", "--prompt-ids", "1,2,3", "--provider", "qnn",
            "--strict", "--json"]
    assert main(argv) == 2
    assert "QNNExecutionProvider" in capsys.readouterr().err


def test_the_generate_hook_prefills_on_ort_and_decodes_the_same_tokens(llama_dir):
    from edge_node.model import SamplingConfig, generate, load_model
    from edge_node.model.decode import decode_loop
    from edge_node.model.sampling import Sampler
    from npu_backends.build import prefill_step
    from npu_backends.options import PrefillOptions

    model = load_model(llama_dir, pack=True)  # as `edgefed generate` loads it
    prompt = prompt_of(50, seed=12)
    step = prefill_step(model, llama_dir, PrefillOptions(chunk=32, context=64))
    greedy = SamplingConfig(greedy=True)
    got = decode_loop(step, prompt, 10, Sampler(greedy), (), model.config.max_position_embeddings)
    assert got.token_ids == generate(model, prompt, 10, greedy).token_ids


def test_a_prompt_longer_than_the_model_holds_is_named_before_any_export(llama_dir, capsys, tmp_path):
    limit = json.loads((llama_dir / "config.json").read_text())["max_position_embeddings"]
    argv = ["prefill", "--model", str(llama_dir), "--chunk", "32", "--prompt-ids", _ids(limit + 7), "--int8",
            "--graph-dir", str(tmp_path), "--json"]
    assert main(argv) == 2
    assert f"the prompt has {limit + 7} tokens" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing exported or calibrated for a prompt that cannot run


def test_int8_block_runs_and_needs_int8(llama_dir, capsys, tmp_path):
    _, out, recipe = _int8_recipe_run(llama_dir, capsys, tmp_path, "--block")
    assert out["max_abs_logit_error"] < 0.5 and recipe["block"] == 16
    assert main(["prefill", "--model", str(llama_dir), "--prompt-ids", "1,2,3", "--block"]) == 2
    assert "--block needs --int8" in capsys.readouterr().err


def test_int8_token_runs_records_its_recipe_and_excludes_the_others(llama_dir, capsys, tmp_path):
    _, out, recipe = _int8_recipe_run(llama_dir, capsys, tmp_path, "--token")
    assert out["max_abs_logit_error"] < 0.5
    assert recipe["mode"] == "token" and recipe["gptq"] is True and recipe["rotate_inputs"] is True
    assert main(["prefill", "--model", str(llama_dir), "--prompt-ids", "1,2,3", "--token"]) == 2
    assert "--token needs --int8" in capsys.readouterr().err
    assert main(["prefill", "--model", str(llama_dir), "--prompt-ids", "1,2,3", "--int8", "--token", "--block"]) == 2
    assert "choose one" in capsys.readouterr().err


def test_int8_token2_runs_records_its_recipe_and_excludes_the_others(llama_dir, capsys, tmp_path):
    argv, out, recipe = _int8_recipe_run(llama_dir, capsys, tmp_path, "--token2")
    assert out["max_abs_logit_error"] < 0.5
    assert recipe["two_pass"] == ["o"] and recipe["two_level"] == ["down"] and recipe["fused_scales"] is True
    assert main(argv) == 0  # the second run reuses the graphs its recipe names
    assert json.loads(capsys.readouterr().out)["int8"] == "token2"
    assert main(["prefill", "--model", str(llama_dir), "--prompt-ids", "1,2,3", "--token2"]) == 2
    assert "--token2 needs --int8" in capsys.readouterr().err
    assert main(["prefill", "--model", str(llama_dir), "--prompt-ids", "1,2,3", "--int8", "--token", "--token2"]) == 2
    assert "choose one" in capsys.readouterr().err
    gen = ["generate", "--model", str(llama_dir), "--prompt-ids", _ids(40), "--max-new-tokens", "2", "--prefill",
           "ort", "--chunk", "32", "--int8", "--token2", "--graph-dir", str(tmp_path), "--json"]
    assert main(gen) == 0 and len(json.loads(capsys.readouterr().out)["token_ids"]) == 2


def test_int8_fine_records_its_recipe_and_excludes_the_others(llama_dir, capsys, tmp_path):
    argv, out, recipe = _int8_recipe_run(llama_dir, capsys, tmp_path, "--fine")
    assert out["max_abs_logit_error"] < 0.2
    assert recipe["two_pass"] == ["qkv", "o", "gate", "up", "down"] and recipe["two_level"] == ["down"]
    assert recipe["fine"] == 11 and recipe["smooth_alpha"] is None
    assert main(argv) == 0 and json.loads(capsys.readouterr().out)["int8"] == "fine"  # reused
    assert main(["prefill", "--model", str(llama_dir), "--prompt-ids", "1,2,3", "--int8", "--fine", "--token2"]) == 2
    assert "choose one" in capsys.readouterr().err
    gen = ["generate", "--model", str(llama_dir), "--prompt-ids", _ids(40), "--max-new-tokens", "2", "--prefill",
           "ort", "--chunk", "32", "--int8", "--fine", "--graph-dir", str(tmp_path), "--json"]
    assert main(gen) == 0 and len(json.loads(capsys.readouterr().out)["token_ids"]) == 2
    assert main([a for a in gen if a != "--int8"]) == 2 and "--fine needs --int8" in capsys.readouterr().err


def test_generate_takes_the_token_recipe_for_its_ort_prefill(llama_dir, capsys, tmp_path):
    base = ["generate", "--model", str(llama_dir), "--prompt-ids", _ids(40), "--max-new-tokens", "3",
            "--prefill", "ort", "--chunk", "32"]
    assert main([*base, "--token"]) == 2
    assert "--token needs --int8" in capsys.readouterr().err
    assert main([*base, "--int8", "--token", "--shadow"]) == 2
    assert "choose one" in capsys.readouterr().err
    assert main([*base, "--int8", "--token", "--graph-dir", str(tmp_path), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 3
    assert "token" in json.loads((tmp_path / "graphs.json").read_text())["int8"]
