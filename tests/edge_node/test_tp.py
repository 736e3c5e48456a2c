"""Tensor-parallel generation equals single-node greedy, token for token, logits within 1e-4 (float32),
for uneven splits over 2 and 3 ranks and every window from 1 block to all resident; plus the CLI contract
and the timeouts."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import time

import pytest
import torch

from edge_node.model import generate, load_model
from edge_node.ports import free_port
from edge_node.shard import write_shards
from tests.checkpoints import copy_model, make_checkpoint

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11]
NEW = 12


def _rank_main(rank: int, world: int, master: str, shards: str, windows: list, allreduce: str, results) -> None:
    from edge_node.collectives import Comm
    from edge_node.engine import run_rank
    from edge_node.run_config import RunConfig

    torch.set_num_threads(1)
    comm = Comm(rank, world, master, timeout_s=60, allreduce=allreduce)
    try:
        for w in windows:
            run = RunConfig(shards=shards, prompt_ids=PROMPT, max_new_tokens=NEW, window=w, allreduce=allreduce)
            r = run_rank(run, keep_logits=True, comm=comm)
            if r is not None:
                results.put((w, r["token_ids"], torch.stack(r["logits"]).tolist(), r["per_rank_window"]))
    finally:
        comm.close()


def run_group(shards, world: int, windows: list, allreduce: str = "star") -> dict:
    """One process group per test (start-up is the slow part), one generation per window."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    master = f"127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(r, world, master, str(shards), windows, allreduce, results))
             for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in windows:
            w, ids, logits, per_rank = results.get(timeout=120)
            out[w] = (ids, torch.tensor(logits), per_rank)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return out


def reference(model_dir) -> tuple[list[int], torch.Tensor]:
    """Single-node greedy tokens and the logits at each generated position."""
    model = load_model(model_dir)
    ids = generate(model, PROMPT, NEW).token_ids
    with torch.no_grad():
        full = model(torch.tensor([PROMPT + ids]), model.new_cache())[0]  # (S, vocab)
    return ids, full[len(PROMPT) - 1: len(PROMPT) - 1 + NEW]


CASES = {
    "llama-2-ranks-2to1": (dict(arch="llama"), 2, [2, 1], "star"),
    "llama-bias-3-ranks-3to2to1": (dict(arch="llama", num_key_value_heads=4, attention_bias=True, mlp_bias=True),
                                   3, [3, 2, 1], "star"),
    "qwen2-tied-2-ranks-gloo": (dict(arch="qwen2", tie=True), 2, [1, 3], "gloo"),
    # 3 ranks over 2 KV heads: rank 2 holds MLP columns only; o_proj bias stays on rank 0
    "llama-bias-3-ranks-over-2-kv-heads": (dict(arch="llama", attention_bias=True), 3, [2, 2, 1], "star"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_tp_equals_single_node_for_every_window(case, tmp_path):
    kwargs, world, ratios, allreduce = CASES[case]
    make_checkpoint(tmp_path / "m", **kwargs)
    write_shards(tmp_path / "m", tmp_path / "s", world, ratios)
    layers = 4
    windows = [*range(1, layers + 1), None]
    ref_ids, ref_logits = reference(tmp_path / "m")
    got = run_group(tmp_path / "s", world, windows, allreduce)
    for w in windows:
        ids, logits, per_rank = got[w]
        assert ids == ref_ids, (case, w)
        assert (logits - ref_logits).abs().max().item() < 1e-4, (case, w)
        if w is not None:
            assert per_rank[1:] == [w] * (world - 1) and per_rank[0] == w


def edgefed(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgefed", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def shards2(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp")
    make_checkpoint(path / "m")
    write_shards(path / "m", path / "s", 2, [2, 1])
    return path


def test_tp_generate_cli_json_contract(shards2):
    r = edgefed("tp-generate", "--shards", str(shards2 / "s"), "--nodes", "2", "--window", "2",
                "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6", "--greedy", "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"token_ids", "text", "ttft_ms", "tpot_ms", "peak_rss_mb", "per_rank_peak_rss_mb", "per_token"} <= set(out)
    assert out["token_ids"] == generate(load_model(shards2 / "m"), [5, 6, 7, 8], 6).token_ids
    assert len(out["per_rank_peak_rss_mb"]) == 2 and min(out["per_rank_peak_rss_mb"]) > 10
    assert len(out["per_token"]) == 6
    assert set(out["per_token"][0]) == {"compute_ms", "comm_ms", "io_wait_ms"}
    assert out["per_rank_window"] == [2, 2] and out["bytes_read_per_token"] > 0


def test_memory_budget_derives_the_window(shards2):
    r = edgefed("tp-generate", "--shards", str(shards2 / "s"), "--memory-mb", "100000",
                "--prompt-ids", "5,6,7,8", "--max-new-tokens", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["per_rank_window"] == [5, 4]  # everything fits: rank 0 streams 4 layers + 1 head chunk
    assert out["kv_cache_mb"] > 0
    r = edgefed("tp-generate", "--shards", str(shards2 / "s"), "--memory-mb", "10",
                "--prompt-ids", "5,6,7,8", "--max-new-tokens", "2", "--json")
    assert r.returncode != 0 and "not enough for one" in r.stderr and "Traceback" not in r.stderr


def test_wrong_node_count_is_a_clear_error(shards2):
    r = edgefed("tp-generate", "--shards", str(shards2 / "s"), "--nodes", "3", "--prompt-ids", "5", "--json")
    assert r.returncode != 0 and "sharded for 2 nodes" in r.stderr


def test_a_rank_that_never_joins_fails_within_the_timeout(shards2):
    t0 = time.monotonic()
    r = edgefed("tp-generate", "--shards", str(shards2 / "s"), "--rank", "0", "--timeout", "3",
                "--master-addr", f"127.0.0.1:{free_port()}", "--prompt-ids", "5,6", "--max-new-tokens", "2",
                "--json", timeout=60)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0 and "did not form within 3 s" in r.stderr and "Traceback" not in r.stderr
    assert elapsed < 30


def test_a_corrupt_shard_fails_the_run_naming_the_file(shards2, tmp_path):
    import shutil

    s = tmp_path / "s"
    shutil.copytree(shards2 / "s", s)
    victim = s / "rank1" / "layer0002.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x10
    victim.write_bytes(bytes(data))
    r = edgefed("tp-generate", "--shards", str(s), "--timeout", "20", "--prompt-ids", "5,6",
                "--max-new-tokens", "2", "--json")
    assert r.returncode != 0 and "rank1/layer0002.safetensors" in r.stderr and "sha256" in r.stderr


def test_text_prompt_uses_the_tokenizer_copied_beside_the_shards(llama_dir, tmp_path):
    from tokenizers import Tokenizer

    model_dir = copy_model(llama_dir, tmp_path / "m", char_tokenizer=True)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    write_shards(model_dir, tmp_path / "s", 2)
    r = edgefed("tp-generate", "--shards", str(tmp_path / "s"), "--prompt", "hello", "--max-new-tokens", "5",
                "--json", "--allreduce", "gloo")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    expected = generate(load_model(model_dir), tok.encode("hello").ids, 5).token_ids
    assert out["token_ids"] == expected and out["text"] == tok.decode(expected)


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_low_precision_shards_generate_close_to_float(llama_dir, tmp_path, weights):
    write_shards(llama_dir, tmp_path / "s", 2, [1, 1], weights=weights)
    r = edgefed("tp-generate", "--shards", str(tmp_path / "s"), "--window", "2", "--prompt-ids", "5,6,7,8",
                "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["weights"] == weights and len(out["token_ids"]) == 4
    assert out["token_ids"][0] == generate(load_model(llama_dir), [5, 6, 7, 8], 1).token_ids[0]


def test_rank0_prefills_on_onnx_runtime_and_hands_every_rank_its_kv_slice(tmp_path):
    # 3 ranks over 2 KV heads: one rank holds no attention heads and receives no KV.
    make_checkpoint(tmp_path / "m", num_key_value_heads=2)
    write_shards(tmp_path / "m", tmp_path / "s", 3, [2, 1, 1])
    prompt = ",".join(str(5 + i % 60) for i in range(40))
    graphs = tmp_path / "graphs"
    r = edgefed("prefill", "--model", str(tmp_path / "m"), "--backend", "ort", "--chunk", "32", "--context", "64",
                "--graph-dir", str(graphs), "--prompt-ids", prompt, "--json")
    assert r.returncode == 0, r.stderr
    new = 10  # every greedy token after the ORT prefill, not just the first, must equal the single-node reference
    r = edgefed("tp-generate", "--shards", str(tmp_path / "s"), "--prefill", "ort", "--graph-dir", str(graphs),
                "--prompt-ids", prompt, "--max-new-tokens", str(new), "--greedy", "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    expected = generate(load_model(tmp_path / "m"), [int(t) for t in prompt.split(",")], new).token_ids
    assert len(expected) == new
    assert out["token_ids"] == expected
    assert out["prefill"] == "ort" and out["prefill_provider"] == "CPUExecutionProvider"


def test_tp_prefill_on_onnx_runtime_without_exported_graphs_is_a_clear_error(shards2, tmp_path):
    r = edgefed("tp-generate", "--shards", str(shards2 / "s"), "--prefill", "ort", "--graph-dir", str(tmp_path),
                "--prompt-ids", "5,6,7", "--max-new-tokens", "2", "--json", "--timeout", "10")
    assert r.returncode != 0 and "no exported chunk graphs" in r.stderr and "Traceback" not in r.stderr
