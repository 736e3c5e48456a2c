"""Collectives: star and gloo allreduce agree with a plain sum; a vanished rank is a CommError, not a hang."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from edge_node.collectives import Comm, CommError
from edge_node.ports import free_port


def _member(rank: int, world: int, master: str, mode: str, results, leave_early: bool) -> None:
    comm = Comm(rank, world, master, timeout_s=5, allreduce=mode)
    if leave_early:
        return  # joined, then gone without a word: its peers must not hang
    x = torch.full((3, 4), float(rank + 1))
    t0 = time.monotonic()
    try:
        y = comm.allreduce(x)
        results.put((rank, y.tolist(), None, time.monotonic() - t0))
        comm.close()
    except CommError as e:
        results.put((rank, None, str(e), time.monotonic() - t0))


def run(world: int, mode: str, leaver: int | None = None) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    master = f"127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_member, args=(r, world, master, mode, results, r == leaver)) for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in range(world - (leaver is not None)):
            rank, y, err, waited = results.get(timeout=60)
            out[rank] = (y, err, waited)
    finally:
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
    return out


@pytest.mark.parametrize("mode", ["star", "gloo"])
def test_allreduce_sums_over_three_ranks(mode):
    out = run(3, mode)
    assert all(y == [[6.0] * 4] * 3 and err is None for y, err, _ in out.values())


def test_a_rank_that_leaves_is_a_comm_error_within_the_timeout():
    out = run(2, "star", leaver=1)
    _, err, waited = out[0]
    assert err is not None and "rank 0: star allreduce" in err
    assert waited < 15
