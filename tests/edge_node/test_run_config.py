"""One frozen RunConfig, built once from the command line and handed whole to every rank."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields

import pytest

from edge_node.model import SamplingConfig
from edge_node.model.errors import UsageError
from edge_node.run_config import EarlyExitOptions, RunConfig
from edge_node.shard import write_shards
from edgefed.cli import build_parser
from edgefed.commands.tp_generate import config_from_args
from npu_backends.options import PrefillOptions
from tests.checkpoints import make_checkpoint

EVERYTHING = RunConfig(
    shards="/s", prompt_ids=(5, 6, 7), max_new_tokens=9, dtype="bfloat16", threads=1, logprobs=3,
    sampling=SamplingConfig(greedy=False, temperature=0.7, top_k=5, top_p=0.9, seed=3, repetition_penalty=1.1),
    prefill=PrefillOptions(chunk=32, context=64, provider="qnn", strict=True, int8=True, shadow=True,
                           graph_dir="/g", threads=1),
    memory_mb=900.0, allreduce="gloo", timeout_s=12.5, drop_page_cache=True, adapter="/a")


def test_every_field_survives_the_json_round_trip():
    default = RunConfig(shards="/s")
    assert all(getattr(EVERYTHING, f.name) != getattr(default, f.name) for f in fields(RunConfig)
               if f.name not in ("model", "shards", "window", "exits"))  # the example really sets every option
    assert RunConfig.from_json(EVERYTHING.to_json()) == EVERYTHING
    assert RunConfig.from_json(EVERYTHING.to_json()).sha256 == EVERYTHING.sha256


def test_early_exit_options_survive_the_json_round_trip():
    # early exit runs with every layer resident and torch prefill: its own example
    exits = EarlyExitOptions("/h/exits.json", 0.5, "margin", "collaborative", "cloud:7000", 20, "int8", 3.0, (10, 20))
    assert all(getattr(exits, f.name) != getattr(EarlyExitOptions(), f.name) for f in fields(EarlyExitOptions))
    run = RunConfig(shards="/s", threads=1, exits=exits)
    assert RunConfig.from_json(run.to_json()) == run and RunConfig.from_json(run.to_json()).sha256 == run.sha256


@pytest.mark.parametrize("text, message", [
    ('{"shards": "/s", "windw": 2}', "unknown field.*windw"),
    ('{"shards": "/s", "sampling": {"temprature": 1}}', "sampling: unknown field.*temprature"),
    ('{"shards": "/s", "prefill": {"chunck": 32}}', "prefill: unknown field.*chunck"),
    ('{"model": "/m", "shards": "/s"}', "exactly one of a model directory and a shard directory"),
    ("[1, 2]", "expected a JSON object"),
    ('{"shards": "/s", "exits": {"exits": "auto", "treshold": 0.5}}', "exits: unknown field.*treshold"),
    ('{"shards": "/s", "exits": {"exits": "auto", "threshold": 1.5}}', r"exit threshold must be in \[0, 1\]"),
    ('{"shards": "/s", "exits": {"exits": "auto", "mode": "collaborative"}}', "needs the cloud tier's address"),
    ('{"shards": "/s", "exits": {"exits": "auto", "split": 0}}', "split k must be a layer index"),
    ('{"shards": "/s", "window": 2, "exits": {"exits": "auto"}}', "every layer resident"),
    ('{"shards": "/s", "logprobs": 2, "exits": {"exits": "auto"}}', "not reported with early exit"),
    ('{"shards": "/s", "timeout_s": 5, "exits": {"exits": "auto", "cloud": "c:1"}}', "shorter than the ranks'"),
])
def test_a_bad_run_configuration_is_named(text, message):
    with pytest.raises(UsageError, match=message):
        RunConfig.from_json(text)


@pytest.mark.slow
def test_every_option_a_user_sets_reaches_every_rank(tmp_path):
    make_checkpoint(tmp_path / "m")
    write_shards(tmp_path / "m", tmp_path / "s", 2, [1, 1])
    graphs = str(tmp_path / "g")
    prompt = ",".join(str(5 + i) for i in range(20))

    def edgefed(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edgefed", *argv], capture_output=True, text=True, timeout=180)

    r = edgefed("prefill", "--model", str(tmp_path / "m"), "--chunk", "32", "--context", "32",
                "--graph-dir", graphs, "--prompt-ids", prompt, "--json")
    assert r.returncode == 0, r.stderr
    argv = ["tp-generate", "--shards", str(tmp_path / "s"), "--window", "2", "--allreduce", "gloo",
            "--timeout", "45", "--drop-page-cache", "--threads", "1", "--dtype", "bfloat16",
            "--prompt-ids", prompt, "--max-new-tokens", "3", "--temperature", "0.7", "--top-k", "5",
            "--top-p", "0.9", "--seed", "3", "--repetition-penalty", "1.1", "--logprobs", "2",
            "--prefill", "ort", "--chunk", "32", "--graph-dir", graphs, "--json"]
    expected = config_from_args(build_parser().parse_args(argv))
    assert (expected.window, expected.allreduce, expected.timeout_s, expected.drop_page_cache, expected.threads,
            expected.dtype, expected.logprobs, expected.prefill.graph_dir) == (
            2, "gloo", 45.0, True, 1, "bfloat16", 2, graphs)
    assert expected.sampling == SamplingConfig(greedy=False, temperature=0.7, top_k=5, top_p=0.9, seed=3,
                                               repetition_penalty=1.1)
    r = edgefed(*argv)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["per_rank_config_sha256"] == [expected.sha256] * 2  # both ranks ran exactly this configuration
    assert out["dtype"] == "bfloat16" and out["allreduce"] == "gloo" and out["per_rank_window"] == [2, 2]
    assert out["prefill"] == "ort" and len(out["logprobs"]) == 3
    assert all(len(e["top_logprobs"]) == 2 for e in out["logprobs"])
