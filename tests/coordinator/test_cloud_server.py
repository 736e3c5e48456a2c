"""The cloud tier as a real process on loopback (`edgefed cloud-serve`), reached over gRPC with deadlines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from coordinator.cloud import CloudContextManager, InProcessTransport
from edge_node.cloud_link import CloudUnavailable, GrpcTransport, SessionSpec, generate_collaborative
from edge_node.early_exit import ExitPolicy
from edge_node.model import load_model
from edge_node.model.formats import weights_digest
from tests.checkpoints import make_checkpoint
from tests.exits import noisy_heads

PROMPT = [5, 9, 33, 2, 100, 7, 64, 12]
K, EXITS = 3, (1, 3)


def start_cloud(model_dir, log_dir, timeout_s: float = 90.0) -> tuple[subprocess.Popen, str]:
    """`edgefed cloud-serve` on a free loopback port; returns the process and the address it printed."""
    out = log_dir / "cloud.out"
    with open(out, "w") as f, open(log_dir / "cloud.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "edgefed", "cloud-serve", "--model", str(model_dir),
                                 "--split", str(K), "--port", "0", "--threads", "1"], stdout=f, stderr=err,
                                env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = out.read_text()
        if "listening on" in text:
            return proc, text.split("listening on ")[1].split()[0]
        if proc.poll() is not None:
            raise RuntimeError(f"cloud-serve exited {proc.returncode}: {(log_dir / 'cloud.err').read_text()}")
        time.sleep(0.1)
    stop(proc)
    raise TimeoutError("cloud-serve did not start listening in time")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("six")
    make_checkpoint(path, num_hidden_layers=6, seed=3)
    return path


@pytest.mark.slow
def test_grpc_cloud_equals_in_process_and_a_killed_cloud_falls_back(model_dir, tmp_path):
    full, edge = load_model(model_dir), load_model(model_dir, end=K, head=True)
    heads = noisy_heads(full, EXITS)
    policy = ExitPolicy.uniform(EXITS, 0.06)
    digest = weights_digest(model_dir)
    local = CloudContextManager(load_model(model_dir, start=K), digest)
    expected = generate_collaborative(edge, heads, policy, K, InProcessTransport(local),
                                      SessionSpec("a", digest, K), PROMPT, 16)
    assert "cloud" in expected.usage()
    proc, address = start_cloud(model_dir, tmp_path)
    try:
        link = GrpcTransport(address, timeout_s=10.0)
        got = generate_collaborative(edge, heads, policy, K, link, SessionSpec("a", digest, K), PROMPT, 16)
        assert got.token_ids == expected.token_ids and got.usage() == expected.usage() and got.cloud == "used"
        stats = link.stats()
        assert stats["tokens_answered"] == expected.usage()["cloud"] and stats["sessions"] == 0

        def kill_after_two(_token: int, seen=[]) -> None:  # noqa: B006 - a counter across calls
            seen.append(_token)
            if len(seen) == 2:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)

        t0 = time.monotonic()
        lost = generate_collaborative(edge, heads, ExitPolicy.uniform(EXITS, 1.0), K, GrpcTransport(address, 2.0),
                                      SessionSpec("b", digest, K), PROMPT, 8, on_token=kill_after_two)
        assert lost.cloud == "lost" and len(lost.token_ids) == 8
        assert [r.where for r in lost.records] == ["cloud"] * 2 + ["edge-fallback"] * 6
        assert time.monotonic() - t0 < 20  # the deadline, not a hang
        with pytest.raises(CloudUnavailable):
            GrpcTransport(address, 1.0).open(SessionSpec("c", digest, K))
    finally:
        stop(proc)
