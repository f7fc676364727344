"""``--max-num-seqs`` slots with a FIFO queue, reported as vLLM's running/waiting gauges."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class SlotScheduler:
    """At most ``slots`` requests run at once; the others wait in arrival order.

    A finishing request hands its slot straight to the oldest waiter, so a
    newcomer can never overtake the queue (vLLM's scheduler is FCFS too).
    Must be used from one event loop.
    """

    def __init__(self, slots: int, on_change: Callable[[int, int], None] | None = None) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self._running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._on_change = on_change or (lambda running, waiting: None)

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    def _changed(self) -> None:
        self._on_change(self._running, self.waiting)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold a slot for the block; yields the seconds spent waiting for it."""
        arrived = time.monotonic()
        if self._running < self.slots and not self._waiters:
            self._running += 1
            self._changed()
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            self._changed()
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # the slot was handed over just as we were cancelled: pass it on
                else:
                    self._waiters.remove(waiter)
                    self._changed()
                raise
        try:
            yield time.monotonic() - arrived
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter: running stays the same
                self._changed()
                return
        self._running -= 1
        self._changed()
