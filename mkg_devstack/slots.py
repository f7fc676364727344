"""The dev stack's one slot model: ``--max-num-seqs`` slots with a FIFO queue, as vLLM's scheduler admits requests.

Both stand-ins for a vLLM server use it: the local VLM server (``local_server/app.py``) holds a slot while
its OCR model works, and the simulated GPU server's fixed and growing modes (``benchmarks/simulated_vllm.py``,
``BatchClock``) hold one for a request's simulated service time. Their gauges (``vllm:num_requests_running``,
``vllm:num_requests_waiting``) and the simulator's peaks are read from here.

Standard library only: the simulated server imports it and must stay lean.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class SlotScheduler:
    """At most ``slots`` requests run at once; the others wait in arrival order.

    A finishing request hands its slot straight to the oldest waiter, so a newcomer can never overtake
    the queue (vLLM's scheduler is FCFS too). A waiter that is cancelled leaves the queue; one cancelled
    just as it was handed a slot passes the slot on. ``on_change(running, waiting)`` is called on every
    change. Must be used from one event loop.
    """

    def __init__(self, slots: int, on_change: Callable[[int, int], None] | None = None) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self._running = 0
        # Waiters not yet handed a slot. A cancelled one stays until its own task removes it (the next loop
        # iteration): ``_release`` skips it, so ``waiting`` counts only the live ones, kept in ``_waiting``.
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._waiting = 0
        self._on_change = on_change or (lambda running, waiting: None)
        self.peak_running = 0
        self.peak_waiting = 0

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._waiting

    def reset_peaks(self) -> None:
        """Peaks from now on start at the current gauges."""
        self.peak_running, self.peak_waiting = self._running, self._waiting

    def _changed(self) -> None:
        self.peak_running = max(self.peak_running, self._running)
        self.peak_waiting = max(self.peak_waiting, self._waiting)
        self._on_change(self._running, self._waiting)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold a slot for the block; yields the seconds spent waiting for it (the event loop's clock)."""
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        if self._running < self.slots and not self._waiters:
            self._running += 1
            self._changed()
        else:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            self._waiting += 1
            self._changed()
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # the slot was handed over just as we were cancelled: pass it on
                else:
                    try:
                        self._waiters.remove(waiter)
                    except ValueError:
                        pass  # a release already skipped (and dropped) it, and counted it out
                    else:
                        self._waiting -= 1
                        self._changed()
                raise
        try:
            yield loop.time() - arrived
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            self._waiting -= 1
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter: running stays the same
                self._changed()
                return
        self._running -= 1
        self._changed()
