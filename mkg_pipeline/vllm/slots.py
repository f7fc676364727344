"""Slot dispatch of the adaptive limiter: who may send a request now, and waking those who wait.

:class:`SlotPool` knows nothing of how the limit moves; :class:`~mkg_pipeline.vllm.limiter.AdaptiveLimiter`
extends it with the control law. Its state lives behind a :class:`threading.Lock` held only for short
synchronous updates. A caller that waits, waits on a future of its own event loop, resolved with
``call_soon_threadsafe``, so steps running under different loops (Dagster runs each step under its
own ``asyncio.run``, possibly in threads) share one pool.
"""

from __future__ import annotations

import asyncio
import enum
import threading
from collections import deque
from types import TracebackType


class Signal(enum.StrEnum):
    """How one attempt ended, as far as the limiter cares."""

    OK = "ok"  # an answer: its latency is a sample
    OVERLOAD = "overload"  # 429 or 503: the server says it is overloaded
    TIMEOUT = "timeout"  # no answer within the deadline
    NONE = "none"  # anything else (4xx, connection refused, cancelled): says nothing about load


class _Waiter:
    __slots__ = ("future", "granted", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.granted = False


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Slot:
    """The right to have one attempt in flight. Release it exactly once, with how it ended."""

    __slots__ = ("_done", "_load", "_pool")

    def __init__(self, pool: SlotPool) -> None:
        self._pool = pool
        self._done = False
        #: the limit when the slot was taken: the load this attempt was sent into (slow start compares
        #: what the server answered at each load)
        self._load = pool.limit

    def release(self, signal: Signal = Signal.NONE, latency_s: float | None = None) -> None:
        """Give the slot back; ``Signal.OK`` with the attempt's latency is a sample. Idempotent."""
        if self._done:
            return
        self._done = True
        self._pool._release(signal, latency_s, self._load)

    def __enter__(self) -> Slot:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class SlotPool:
    """At most :attr:`limit` attempts in flight; FIFO waiters; capacity waiters for callers that only look.

    Subclasses move the limit and hook in through the ``*_locked`` methods below (called with the lock
    held): :meth:`_due_locked` (apply what fell due; True if the limit may have changed),
    :meth:`_on_demand_locked` (how many wanted to be in flight) and :meth:`_on_release_locked`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._slot_waiters: deque[_Waiter] = deque()
        self._capacity_waiters: deque[_Waiter] = deque()

    # -- what subclasses provide ----------------------------------------------------------------

    @property
    def limit(self) -> int:
        raise NotImplementedError

    def _due_locked(self) -> bool:
        return False

    def _on_demand_locked(self, demand: int) -> None:
        pass

    def _on_release_locked(self, signal: Signal, latency_s: float | None, load: int) -> None:
        pass

    # -- observation ----------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Attempts holding a slot."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Attempts of this process waiting for a slot (not the server's queue)."""
        return len(self._slot_waiters)

    @property
    def idle(self) -> bool:
        """Nothing in flight and nobody waiting: no reason to watch the server."""
        return self._in_flight == 0 and not self._slot_waiters and not self._capacity_waiters

    def has_room(self) -> bool:
        """True if a request could start at once (``in_flight + waiting < limit``)."""
        with self._lock:
            if self._due_locked():
                self._dispatch_locked()
            return self._in_flight + len(self._slot_waiters) < self.limit

    # -- slots ----------------------------------------------------------------------------------

    def try_acquire(self) -> Slot | None:
        """A slot if one is free now (and nobody is queued before us), else None. No waiting."""
        with self._lock:
            if self._due_locked():
                self._dispatch_locked()
            if self._slot_waiters or self._in_flight >= self.limit:
                return None
            self._take_locked()
        return Slot(self)

    async def acquire(self) -> Slot:
        """Wait (FIFO) for a free slot of this process."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._due_locked():
                self._dispatch_locked()
            if not self._slot_waiters and self._in_flight < self.limit:
                self._take_locked()
                return Slot(self)
            waiter = _Waiter(loop)
            self._slot_waiters.append(waiter)
            self._on_demand_locked(self._in_flight + len(self._slot_waiters))
        try:
            await waiter.future
        except asyncio.CancelledError:
            with self._lock:
                if waiter.granted:  # the slot was handed over just as we were cancelled: give it back
                    self._in_flight -= 1
                elif waiter in self._slot_waiters:  # (a dispatch may already have dropped it as cancelled)
                    self._slot_waiters.remove(waiter)
                self._dispatch_locked()
            raise
        return Slot(self)

    async def wait_for_capacity(self) -> None:
        """Resolve once a new request could start at once (``in_flight + waiting < limit``).

        The primitive a producer awaits instead of polling: it returns at once while there is room,
        else when a slot is released, the limit rises or a waiter ahead gives up, whichever comes
        first, in any event loop of any thread. Waiters wake in FIFO order, one per free slot. It
        reserves nothing (the caller then takes its slot with :meth:`acquire`), and a caller that
        waits here tells the limiter its limit is in use, so the limit may grow.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._due_locked():
                self._dispatch_locked()
            if self._in_flight + len(self._slot_waiters) < self.limit:
                return
            waiter = _Waiter(loop)
            self._capacity_waiters.append(waiter)
            # Somebody wants more than the limit allows: the limit is in use.
            self._on_demand_locked(self._in_flight + len(self._slot_waiters) + len(self._capacity_waiters))
        try:
            await waiter.future
        except asyncio.CancelledError:
            with self._lock:
                if not waiter.granted:
                    if waiter in self._capacity_waiters:  # a dispatch may already have dropped it as cancelled
                        self._capacity_waiters.remove(waiter)
                else:  # woken for room it will not use: the next waiter may have it
                    self._dispatch_locked()
            raise

    def _take_locked(self) -> None:
        self._in_flight += 1
        self._on_demand_locked(self._in_flight + len(self._slot_waiters))

    def _release(self, signal: Signal, latency_s: float | None, load: int) -> None:
        with self._lock:
            self._in_flight -= 1
            self._on_release_locked(signal, latency_s, load)
            self._dispatch_locked()

    def _dispatch_locked(self) -> None:
        """Hand free slots to queued waiters (FIFO), then wake capacity waiters, one per free slot."""
        limit = self.limit
        while self._slot_waiters and self._in_flight < limit:
            waiter = self._slot_waiters.popleft()
            if waiter.future.cancelled():
                continue
            waiter.granted = True
            self._in_flight += 1
            waiter.loop.call_soon_threadsafe(_resolve, waiter.future)
        room = limit - self._in_flight - len(self._slot_waiters)
        while self._capacity_waiters and room > 0:
            waiter = self._capacity_waiters.popleft()
            if waiter.future.cancelled():
                continue
            waiter.granted = True
            room -= 1
            waiter.loop.call_soon_threadsafe(_resolve, waiter.future)
