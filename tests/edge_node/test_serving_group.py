"""`edgefed serve` as real processes on loopback: a 2-rank group from shards serves request after request
token-identical to single-node generation, survives a cancelled stream and idle time longer than its timeout,
ends a request with UNAVAILABLE (and exits non-zero) when rank 1 is killed, and stops cleanly on SIGTERM;
a whole model serves on one rank. Every process started here is stopped here, by PID."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from edge_node.inference_client import FinalEvent, GenerateParams, InferenceClient, InferenceError
from edge_node.model import SamplingConfig, generate, load_model
from edge_node.ports import free_port
from edge_node.run_config import RunConfig
from edge_node.shard import write_shards
from tests.checkpoints import make_checkpoint

START_S = 120  # every rank loaded and joined (two interpreters importing torch on 2 shared cores)
STOP_S = 15  # gone this long after SIGTERM


class Group:
    """The ranks of one `edgefed serve` group, their stderr in files, and a client to rank 0."""

    def __init__(self, run: RunConfig, world: int, tmp: Path):
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "run.json").write_text(run.to_json())
        master = f"127.0.0.1:{free_port()}"
        self.tmp, self.procs = tmp, []
        for r in range(world):
            with open(tmp / f"err{r}.txt", "w") as err:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "edgefed", "serve", "--run-config", str(tmp / "run.json"), "--rank",
                     str(r), "--master", master, "--insecure", "--ready-file", str(tmp / f"ready{r}.json")],
                    stdout=subprocess.DEVNULL, stderr=err))
        try:
            self.ready = self._wait_ready()
        except BaseException:
            self.kill()
            raise
        self.client = InferenceClient(self.ready["address"], insecure=True)

    def _wait_ready(self) -> dict:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if (self.tmp / "ready0.json").exists():
                return json.loads((self.tmp / "ready0.json").read_text())
            dead = [r for r, p in enumerate(self.procs) if p.poll() is not None]
            assert not dead, f"rank(s) {dead} exited while starting: {self.stderr(dead[0])}"
            time.sleep(0.1)
        raise AssertionError(f"rank 0 not ready within {START_S} s")

    def stderr(self, rank: int) -> str:
        return (self.tmp / f"err{rank}.txt").read_text()

    def wait_exit(self, rank: int, within_s: float) -> int:
        try:
            return self.procs[rank].wait(timeout=within_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"rank {rank} still running {within_s} s later: {self.stderr(rank)}") from None

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A tiny model with 2048 positions that never stops at an EOS, and its shards for 2 ranks (2:1)."""
    path = tmp_path_factory.mktemp("serve")
    make_checkpoint(path / "m", max_position_embeddings=2048, eos_token_id=None)
    write_shards(path / "m", path / "s", 2, [2, 1])
    return path


@pytest.fixture(scope="module")
def group(long_model):
    g = Group(RunConfig(shards=str(long_model / "s"), timeout_s=30, threads=1), 2, long_model / "group")
    try:
        yield g
        g.client.close()
        g.procs[0].send_signal(signal.SIGTERM)  # rank 0 stops the group: both leave cleanly
        assert g.wait_exit(0, STOP_S) == 0, g.stderr(0)
        assert g.wait_exit(1, STOP_S) == 0, g.stderr(1)
    finally:
        g.kill()


@pytest.fixture(scope="module")
def model(long_model):
    return load_model(long_model / "m")


@pytest.mark.slow
def test_two_ranks_serve_consecutive_requests_identical_to_single_node(group, model):
    assert group.ready["world"] == 2 and group.ready["port"] > 0
    for prompt, n in (([5, 17, 42, 7, 99, 3], 14), ([1, 2, 3], 9), ([200, 9, 8, 7, 6, 5, 4, 3, 2, 250], 20)):
        tokens, final = group.client.generate_all(GenerateParams(prompt, n), timeout_s=60)
        assert [t.id for t in tokens] == generate(model, prompt, n).token_ids
        assert (final.stop_reason, final.prompt_tokens, final.completion_tokens) == ("length", len(prompt), n)
    h = group.client.health()
    assert h.world_size == 2 and h.max_positions == 2048 and h.served >= 3


@pytest.mark.slow
def test_a_seeded_sampled_request_repeats_across_ranks(group, model):
    p = GenerateParams([5, 6, 7], 12, temperature=0.8, top_k=50, seed=7)
    first, second = ([t.id for t in group.client.generate_all(p, timeout_s=60)[0]] for _ in range(2))
    ref = generate(model, [5, 6, 7], 12, SamplingConfig(greedy=False, temperature=0.8, top_k=50, seed=7)).token_ids
    assert first == second == ref


@pytest.mark.slow
def test_a_cancelled_stream_leaves_the_group_serving_correctly(group, model):
    stream = group.client.generate(GenerateParams([3, 4, 5], 1500), timeout_s=120)
    for i, _ in enumerate(stream):
        if i == 2:
            stream.cancel()
            break
    t0 = time.monotonic()
    while group.client.health().busy:  # 1500 tokens would keep it busy for many seconds
        assert time.monotonic() - t0 < 5, "generation went on after the call was cancelled"
        time.sleep(0.05)
    prompt = [11, 12, 13, 14]
    tokens, _ = group.client.generate_all(GenerateParams(prompt, 10), timeout_s=60)
    assert [t.id for t in tokens] == generate(model, prompt, 10).token_ids


@pytest.mark.slow
def test_bad_fields_are_invalid_argument_on_the_group(group):
    for params, field in ((GenerateParams([5, 6], 3, top_p=0.0), "top_p"),
                          (GenerateParams([5] * 2049, 3), "prompt_ids")):
        with pytest.raises(InferenceError) as e:
            group.client.generate_all(params, timeout_s=30)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.field == field


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "stalled"])
def test_losing_rank_1_mid_request_is_unavailable_within_the_timeout(long_model, tmp_path, how):
    timeout_s = 6
    g = Group(RunConfig(shards=str(long_model / "s"), timeout_s=timeout_s, threads=1), 2, tmp_path)
    try:
        if how == "killed":
            time.sleep(timeout_s + 1.5)  # idle longer than any rank may wait: rank 0's pings keep the group
        tokens, _ = g.client.generate_all(GenerateParams([5, 6, 7], 4), timeout_s=30)
        assert len(tokens) == 4
        stream = iter(g.client.generate(GenerateParams([5, 6, 7], 1900), timeout_s=120))
        assert not isinstance(next(stream), FinalEvent)
        # a closed socket is seen at once; a stalled peer when the collective's timeout runs out
        g.procs[1].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(InferenceError) as e:
            for _ in stream:
                pass
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and "peer rank" in e.value.details
        assert time.monotonic() - t0 < timeout_s + 10
        assert g.wait_exit(0, timeout_s + 15) == 2
        assert "error: rank 0" in g.stderr(0) and "Traceback" not in g.stderr(0)
    finally:
        g.client.close()
        g.kill()


@pytest.mark.slow
def test_a_model_directory_serves_on_one_rank_and_sigterm_cancels_the_running_request(long_model, tmp_path):
    g = Group(RunConfig(model=str(long_model / "m"), timeout_s=30, threads=1), 1, tmp_path)
    try:
        assert g.ready["world"] == 1 and "plain text" in g.stderr(0)  # --insecure is said out loud
        stream = iter(g.client.generate(GenerateParams([5, 6, 7], 2000), timeout_s=120))
        first = next(stream)
        assert first.id == generate(load_model(long_model / "m"), [5, 6, 7], 1).token_ids[0]
        g.procs[0].send_signal(signal.SIGTERM)
        final = [e for e in stream if isinstance(e, FinalEvent)]
        assert [f.stop_reason for f in final] == ["cancelled"]
        assert g.wait_exit(0, STOP_S) == 0
    finally:
        g.client.close()
        g.kill()


@pytest.mark.slow
def test_serve_errors_are_named_without_a_traceback(long_model, tmp_path):
    (tmp_path / "run.json").write_text(RunConfig(shards=str(long_model / "s")).to_json())
    r = subprocess.run([sys.executable, "-m", "edgefed", "serve", "--run-config", str(tmp_path / "run.json"),
                        "--insecure"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "sharded for 2 nodes: give --master" in r.stderr and "Traceback" not in r.stderr
