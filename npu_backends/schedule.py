"""Out-of-order scheduling of chunk x layer-group cells over an accelerator queue and a CPU queue.

Cell (c, g) is layer group g on chunk c. It needs (c, g-1) for its input hidden states
and (c-1, g) for its layers' K/V of earlier chunks; nothing else. So while the CPU
runs group 1 of chunk 0, the accelerator can already run group 0 of chunk 1 (mllm's
out-of-order subgraph execution). Each queue is one thread that always takes its
earliest ready cell; ONNX Runtime releases the GIL while a session runs, so the two
queues really overlap. Every wait is bounded by a timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

QUEUES = ("accel", "cpu")


@dataclass(frozen=True)
class CellEvent:
    queue: str
    chunk: int
    group: int
    start_s: float
    end_s: float


def ready(done: set[tuple[int, int]], c: int, g: int) -> bool:
    """The dependency rule: (c, g) may run once (c, g-1) and (c-1, g) are done."""
    return (g == 0 or (c, g - 1) in done) and (c == 0 or (c - 1, g) in done)


def alternate(groups: int) -> dict[int, str]:
    """Default placement: even groups on the accelerator, odd ones on the CPU."""
    return {g: QUEUES[g % 2] for g in range(groups)}


def run_cells(chunks: int, groups: int, run: Callable[[int, int], None], placement: Mapping[int, str],
              timeout_s: float = 600.0) -> list[CellEvent]:
    """Run every cell once, each on its group's queue, as soon as its dependencies are done."""
    done: set[tuple[int, int]] = set()
    events: list[CellEvent] = []
    errors: list[BaseException] = []
    cond = threading.Condition()
    todo = {q: [(c, g) for c in range(chunks) for g in range(groups) if placement[g] == q] for q in QUEUES}
    t0 = time.perf_counter()
    deadline = t0 + timeout_s

    def worker(queue: str) -> None:
        cells = todo[queue]
        while cells:
            with cond:
                while not errors and not any(ready(done, c, g) for c, g in cells):
                    if not cond.wait(timeout=max(0.0, deadline - time.perf_counter())):
                        errors.append(TimeoutError(f"{queue} queue waited over {timeout_s:.0f} s for a cell"))
                if errors:
                    cond.notify_all()
                    return
                cell = next((c, g) for c, g in cells if ready(done, c, g))  # cells are in (c, g) order
            cells.remove(cell)
            start = time.perf_counter() - t0
            try:
                run(*cell)
            except BaseException as e:  # handed to the caller below
                with cond:
                    errors.append(e)
                    cond.notify_all()
                return
            with cond:
                done.add(cell)
                events.append(CellEvent(queue, cell[0], cell[1], start, time.perf_counter() - t0))
                cond.notify_all()

    threads = [threading.Thread(target=worker, args=(q,), daemon=True) for q in QUEUES if todo[q]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.perf_counter()) + 1.0)
    if errors:
        raise errors[0]
    if len(done) != chunks * groups:
        raise TimeoutError(f"out-of-order prefill finished {len(done)} of {chunks * groups} cells in {timeout_s} s")
    return sorted(events, key=lambda e: e.start_s)


class OutOfOrder:
    """A `scheduler` for ChunkedPrefill.run: cells of the prefill's layer groups on two queues."""

    def __init__(self, placement: Mapping[int, str] | None = None, timeout_s: float = 600.0):
        self.placement, self.timeout_s = placement, timeout_s
        self.events: list[CellEvent] = []

    def __call__(self, prefill, prompt: Sequence[int], kv) -> tuple[list[np.ndarray], list[float]]:
        n, groups = prefill.chunk, len(prefill.specs)
        chunks = -(-len(prompt) // n)
        placement = self.placement or alternate(groups)
        shared = [prefill.chunk_inputs(prompt, c) for c in range(chunks)]  # small: ids, RoPE rows, masks
        outs: dict[tuple[int, int], np.ndarray] = {}
        t0 = time.perf_counter()
        chunk_end: dict[int, float] = {}

        def run(c: int, g: int) -> None:
            x = outs.pop((c, g - 1)) if g else None  # hidden states are consumed once
            pos0 = c * n
            outs[(c, g)] = prefill.run_cell(g, shared[c], x, kv, pos0, min(n, len(prompt) - pos0))
            if g == groups - 1:
                chunk_end[c] = (time.perf_counter() - t0) * 1e3

        self.events = run_cells(chunks, groups, run, placement, self.timeout_s)
        ends = [chunk_end[c] for c in range(chunks)]
        logits = [outs[(c, groups - 1)] for c in range(chunks)]  # each (1, 1|N, vocab)
        return logits, [b - a for a, b in zip([0.0] + ends, ends, strict=False)]
