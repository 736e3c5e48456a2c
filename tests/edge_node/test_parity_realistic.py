"""Every torch mode against transformers on realistic-scale checkpoints: 64-token prompts, 32 greedy steps,
logits at every position within 1e-4 of their spread (tests/parity.py). Single node, the sliding window
(one block resident, streamed from shards) and tensor parallelism over two ranks.

These tolerances see small errors: scaling the cached keys beyond position 12 by 1.001 fails each mode
(test_a_kv_cache_error_of_a_tenth_of_a_percent_fails_parity proves it in-process).
"""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from edge_node.collectives import Comm
from edge_node.engine import run_rank
from edge_node.model import SamplingConfig, generate, load_model
from edge_node.ports import free_port
from edge_node.run_config import RunConfig
from edge_node.shard import write_shards
from tests.parity import NEW, check_run, prompts, realistic_checkpoint, scale_cached_keys_beyond_12

CASES = {
    "llama": dict(arch="llama"),
    "qwen2-tied-bias": dict(arch="qwen2", tie=True),
    "mistral-sliding-window": dict(arch="mistral", sliding_window=24),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = realistic_checkpoint(path, eos_token_id=None, **CASES[request.param])
    return request.param, path, hf


def single_node(model_dir, prompt: list[int]) -> tuple[list[int], torch.Tensor, list[torch.Tensor]]:
    """edgefed's decode loop on one node; the prefill step returns every prompt position's logits."""
    model = load_model(model_dir, pack=True)
    cache, rows, prefill = model.new_cache(), [], []

    def step(ids: list[int], pos0: int) -> torch.Tensor:
        out = model(torch.tensor([ids]), cache, pos0)[0]  # (S, vocab)
        if pos0 == 0:
            prefill.append(out)
        rows.append(out[-1])
        return out[-1]

    tokens = generate(model, prompt, NEW, SamplingConfig(), step=step).token_ids
    assert tokens == generate(model, prompt, NEW).token_ids  # the default step takes the same path
    return tokens, prefill[0], rows


def test_single_node_matches_transformers_at_every_position(case):
    name, path, hf = case
    for i, prompt in enumerate(prompts(hf.config.vocab_size)):
        tokens, prefill, rows = single_node(path, prompt)
        check_run(hf, prompt, tokens, prefill, rows, f"{name} single node, prompt {i}")


def test_the_sliding_window_matches_transformers_at_every_position(case, tmp_path):
    name, path, hf = case
    write_shards(path, tmp_path / "s", 1)
    for i, prompt in enumerate(prompts(hf.config.vocab_size)):
        run = RunConfig(shards=str(tmp_path / "s"), prompt_ids=prompt, max_new_tokens=NEW, window=1)
        r = run_rank(run, keep_logits=True, comm=Comm(0, 1, ""))
        assert r["per_rank_window"] == [1]
        check_run(hf, prompt, r["token_ids"], r["prefill_logits"], r["logits"], f"{name} window 1, prompt {i}")


def _rank(rank: int, master: str, runs: list[RunConfig], results) -> None:
    torch.set_num_threads(1)
    comm = Comm(rank, 2, master, timeout_s=60)
    try:
        for run in runs:
            r = run_rank(run, keep_logits=True, comm=comm)
            if r is not None:
                results.put((r["token_ids"], r["prefill_logits"].tolist(), torch.stack(r["logits"]).tolist()))
    finally:
        comm.close()


@pytest.mark.slow
def test_tensor_parallel_matches_transformers_at_every_position(tmp_path):
    """Every architecture and prompt through one 2-rank group (uneven split, window 2): the group forms once."""
    cases, runs = {}, []
    for name, kwargs in sorted(CASES.items()):
        hf = realistic_checkpoint(tmp_path / name, eos_token_id=None, **kwargs)
        write_shards(tmp_path / name, tmp_path / f"{name}-s", 2, [2, 1])
        for p in prompts(hf.config.vocab_size):
            cases[len(runs)] = (name, hf)
            runs.append(RunConfig(shards=str(tmp_path / f"{name}-s"), prompt_ids=p, max_new_tokens=NEW, window=2))
    ctx = mp.get_context("spawn")
    results, master = ctx.Queue(), f"127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank, args=(r, master, runs, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=180) for _ in runs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for i, (run, (tokens, prefill, rows)) in enumerate(zip(runs, got, strict=True)):
        name, hf = cases[i]
        check_run(hf, list(run.prompt_ids), tokens, torch.tensor(prefill), list(torch.tensor(rows)),
                  f"{name} 2 ranks, run {i}")


def test_a_kv_cache_error_of_a_tenth_of_a_percent_fails_parity(tmp_path, monkeypatch):
    hf = realistic_checkpoint(tmp_path / "m", eos_token_id=None)
    write_shards(tmp_path / "m", tmp_path / "s", 1)
    prompt = prompts(hf.config.vocab_size)[1]
    scale_cached_keys_beyond_12(monkeypatch)
    with pytest.raises(AssertionError, match="x spread|greedy tokens differ"):
        tokens, prefill, rows = single_node(tmp_path / "m", prompt)
        check_run(hf, prompt, tokens, prefill, rows, "corrupted single node")
    run = RunConfig(shards=str(tmp_path / "s"), prompt_ids=prompt, max_new_tokens=NEW, window=1)
    r = run_rank(run, keep_logits=True, comm=Comm(0, 1, ""))
    with pytest.raises(AssertionError, match="x spread|greedy tokens differ"):
        check_run(hf, prompt, r["token_ids"], r["prefill_logits"], r["logits"], "corrupted window")
