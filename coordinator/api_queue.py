"""Admission to one deployment: a few requests generate, a bounded number wait in order, the rest are refused.

Plain counters and one future per waiter, so a gate works under whichever event loop awaits it.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Gate:
    def __init__(self, concurrency: int = 1, depth: int = 16):
        if concurrency < 1 or depth < 0:
            raise ValueError(f"a gate needs concurrency >= 1 and depth >= 0, got {concurrency}, {depth}")
        self.concurrency, self.depth = concurrency, depth
        self.running = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._mean_s = 0.0  # moving average of how long a request holds its slot

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def retry_after_s(self) -> int:
        """Seconds until a place is likely free: the work queued ahead, at the recent pace."""
        ahead = (self.waiting + self.running) / self.concurrency
        return max(1, min(600, math.ceil(ahead * self._mean_s)))

    async def acquire(self, timeout_s: float) -> None:
        """A slot, in arrival order; QueueFull at once when `depth` requests already wait; TimeoutError after
        `timeout_s` in the queue."""
        if self.running < self.concurrency and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.depth:
            raise QueueFull(self.retry_after_s())
        slot = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        try:
            async with asyncio.timeout(timeout_s):
                await slot
        except BaseException:
            if slot.done() and not slot.cancelled():  # the slot was handed over just as the wait ended
                self.release()
            elif slot in self._waiters:
                self._waiters.remove(slot)
            raise

    def release(self, held_s: float | None = None) -> None:
        if held_s is not None:
            self._mean_s = held_s if self._mean_s == 0 else 0.8 * self._mean_s + 0.2 * held_s
        self.running -= 1
        while self._waiters and self.running < self.concurrency:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot passes straight to the waiter: nobody can cut in
                self.running += 1
