"""The local tensor-parallel launcher: drains the ranks' output while they run, names a rank that dies and
keeps its cause, and stops every rank when it is itself stopped; no process is left behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from edge_node.shard import write_shards
from tests.checkpoints import make_checkpoint

STOP_BOUND_S = 15  # launcher and ranks gone this long after a rank dies or the launcher gets SIGTERM


@pytest.fixture(scope="module")
def long_shards(tmp_path_factory):
    """A tiny model that holds 2048 positions and never stops at an EOS."""
    path = tmp_path_factory.mktemp("long")
    make_checkpoint(path / "m", max_position_embeddings=2048, eos_token_id=None)
    write_shards(path / "m", path / "s", 2)
    return path / "s"


def launch(shards, new: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgefed", "tp-generate", "--shards", str(shards), "--prompt-ids",
                             "5,6,7,8", "--max-new-tokens", str(new), "--json", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ranks_of(launcher: subprocess.Popen, count: int, within_s: float = 60) -> list[psutil.Process]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        kids = psutil.Process(launcher.pid).children()
        if len(kids) == count:
            time.sleep(3)  # let them import and join the group
            return kids
        time.sleep(0.1)
    raise AssertionError(f"the launcher did not start {count} ranks")


def assert_gone(procs: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(procs, timeout=STOP_BOUND_S)
    assert not alive, f"left behind: {[p.pid for p in alive]}"


@pytest.mark.slow
def test_a_generation_past_64_kib_of_json_finishes(long_shards):
    r = subprocess.run([sys.executable, "-m", "edgefed", "tp-generate", "--shards", str(long_shards), "--prompt-ids",
                        "5,6,7,8", "--max-new-tokens", "1500", "--json", "--threads", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) > 64 * 1024  # more than a pipe holds: the launcher drained it while rank 0 ran
    assert len(json.loads(r.stdout)["token_ids"]) == 1500


@pytest.mark.slow
def test_a_killed_rank_is_named_and_ends_the_run(long_shards):
    launcher = launch(long_shards, 1900)
    try:
        ranks = ranks_of(launcher, 2)
        victim = next(p for p in ranks if "--rank" in p.cmdline() and p.cmdline()[p.cmdline().index("--rank") + 1]
                      == "1")
        t0 = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        _, err = launcher.communicate(timeout=STOP_BOUND_S * 2)
        assert time.monotonic() - t0 < STOP_BOUND_S
        assert launcher.returncode == 2
        assert err.splitlines()[0].startswith("edgefed tp-generate: rank 1 (killed by SIGKILL)"), err
        assert "Traceback" not in err
        assert_gone(ranks)
    finally:
        if launcher.poll() is None:
            launcher.kill()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_launcher_stops_every_rank(long_shards, sig):
    launcher = launch(long_shards, 1900)
    try:
        ranks = ranks_of(launcher, 2)
        t0 = time.monotonic()
        launcher.send_signal(sig)
        launcher.communicate(timeout=STOP_BOUND_S * 2)
        assert launcher.returncode == 128 + sig
        assert_gone(ranks)
        assert time.monotonic() - t0 < STOP_BOUND_S
    finally:
        if launcher.poll() is None:
            launcher.kill()


@pytest.mark.slow
def test_ranks_end_when_the_launcher_is_killed_outright(long_shards):
    launcher = launch(long_shards, 1900)
    try:
        ranks = ranks_of(launcher, 2)
        launcher.kill()  # SIGKILL: no handler runs; the ranks' parent-death signal ends them
        launcher.wait(timeout=10)
        assert_gone(ranks)
    finally:
        if launcher.poll() is None:
            launcher.kill()
