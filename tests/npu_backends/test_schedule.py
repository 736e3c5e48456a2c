"""Out-of-order chunk x layer-group scheduling: dependencies hold, both queues work, results are unchanged."""

import threading
import time

import numpy as np
import pytest

from npu_backends.prefill import ChunkedPrefill
from npu_backends.schedule import OutOfOrder, alternate, ready, run_cells
from tests.npu_backends.conftest import prompt_of


def test_a_cell_waits_for_the_group_before_and_the_chunk_before():
    assert ready(set(), 0, 0)
    assert not ready({(0, 0)}, 1, 1)
    assert ready({(0, 0), (0, 1), (1, 0)}, 1, 1)


def test_every_cell_runs_once_after_its_dependencies_and_the_queues_overlap():
    finished, lock = [], threading.Lock()

    def run(c, g):
        time.sleep(0.01)
        with lock:
            assert (g == 0 or (c, g - 1) in finished) and (c == 0 or (c - 1, g) in finished)
            finished.append((c, g))

    events = run_cells(4, 3, run, alternate(3))
    assert sorted(finished) == [(c, g) for c in range(4) for g in range(3)]
    assert {e.queue for e in events} == {"accel", "cpu"}
    # out of order: some chunk c+1 cell starts before chunk c has finished its last group
    end_of = {e.chunk: e.end_s for e in events if e.group == 2}
    assert any(e.start_s < end_of[e.chunk - 1] for e in events if e.chunk > 0)


def test_a_failing_cell_is_reported_not_hung():
    def run(c, g):
        if (c, g) == (1, 0):
            raise RuntimeError("accelerator lost")

    with pytest.raises(RuntimeError, match="accelerator lost"):
        run_cells(3, 2, run, alternate(2), timeout_s=10)


def test_out_of_order_prefill_equals_in_order(llama, graphs):
    prompt = prompt_of(100, seed=5)
    prefill = ChunkedPrefill(llama, graphs[2])
    in_order = prefill.run(prompt)
    scheduler = OutOfOrder()
    ooo = prefill.run(prompt, scheduler=scheduler)
    assert np.abs(in_order.logits - ooo.logits).max() < 1e-6
    for i in range(4):
        assert np.array_equal(in_order.kv.k[i][:, :, :100], ooo.kv.k[i][:, :, :100])
    assert len(scheduler.events) == 4 * 2 and len(ooo.chunk_ms) == 4
