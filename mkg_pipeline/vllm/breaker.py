"""A circuit breaker per VLM server: fail fast while the server is down.

States::

    CLOSED ──(failure_threshold consecutive failures)──► OPEN
    OPEN ──(recovery_timeout_s elapsed, seen on the next acquire)──► HALF_OPEN
    HALF_OPEN ──(success_threshold successes)──► CLOSED
    HALF_OPEN ──(any failure)──► OPEN (recovery timer restarts)

Usage, once per HTTP attempt::

    permit = breaker.acquire(label)      # raises CircuitOpenError, no I/O
    try:
        response = await send()
    except ServerDown as exc:
        permit.record_failure(exc.error_type)
        raise
    else:
        permit.record_success()
    finally:
        permit.release()                 # frees a HALF_OPEN probe slot even on cancellation

A :class:`Permit` is also a context manager whose exit calls ``release()``.
A permit released without a recorded outcome (cancelled, or an unexpected
exception) counts neither way: cancellation says nothing about the server.

The breaker remembers the error type of the failure that opened it
(:attr:`CircuitBreaker.open_cause`), and every :class:`CircuitOpenError` it
raises carries it as ``first_cause``: a page that fails fast is recorded with
the real cause (connect, timeout, ...), not only with ``circuit_open``.

Thread and loop safety: Dagster runs each step under its own ``asyncio.run``,
possibly in threads, and the breaker is shared per process per server URL. So
state lives behind a :class:`threading.Lock` that only guards short,
synchronous transitions and is never held across an ``await``; an
``asyncio.Lock`` would be bound to one event loop.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

from mkg_pipeline.config import CircuitBreakerConfig
from mkg_pipeline.metrics.client import BREAKER_STATE_VALUES, CIRCUIT_BREAKER_STATE
from mkg_pipeline.vllm.errors import CircuitOpenError

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class BreakerState(enum.StrEnum):
    """Breaker states; the values are the keys of ``BREAKER_STATE_VALUES`` (the gauge encoding)."""

    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


class Permit:
    """The right to send one attempt; report its outcome, then release it.

    Only the first ``record_*`` call counts, and ``release()`` is idempotent, so
    ``finally: permit.release()`` is always safe.
    """

    __slots__ = ("_breaker", "_done", "_generation", "_probe", "label")

    def __init__(self, breaker: CircuitBreaker, generation: int, probe: bool, label: str) -> None:
        self._breaker = breaker
        self._generation = generation
        self._probe = probe
        self._done = False
        self.label = label

    @property
    def is_probe(self) -> bool:
        """True when this attempt is a HALF_OPEN probe (it holds one of the limited probe slots)."""
        return self._probe

    def record_success(self) -> None:
        """The server answered usefully (2xx, or a 4xx: the server is up, the request was wrong)."""
        self._finish(success=True)

    def record_failure(self, error_type: str | None = None) -> None:
        """The server failed (timeout, connect error, 5xx, 429, malformed body); ``error_type`` names how."""
        self._finish(success=False, error_type=error_type)

    def release(self) -> None:
        """Free the permit without an outcome if none was recorded (cancellation, unexpected error)."""
        self._finish(success=None)

    def _finish(self, *, success: bool | None, error_type: str | None = None) -> None:
        if self._done:
            return
        self._done = True
        self._breaker._on_permit_done(self._generation, self._probe, success, error_type)

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class CircuitBreaker:
    """Consecutive-failure circuit breaker for one server; see the module docstring."""

    def __init__(
        self, server: str, config: CircuitBreakerConfig | None = None, *, clock: Clock = time.monotonic
    ) -> None:
        self.server = server
        self.config = config or CircuitBreakerConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        # Bumped on every transition: an outcome reported by a permit taken in an earlier
        # state (e.g. a request in flight when the breaker opened) must not move the new state.
        self._generation = 0
        self._consecutive_failures = 0
        self._half_open_successes = 0
        self._probes_in_flight = 0
        self._opened_at = 0.0
        self._open_cause: str | None = None
        self._set_gauge(BreakerState.CLOSED)

    # -- observation -------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The stored state. OPEN → HALF_OPEN happens lazily, on the next :meth:`acquire`."""
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    @property
    def probes_in_flight(self) -> int:
        return self._probes_in_flight

    @property
    def open_cause(self) -> str | None:
        """The error type of the failure that last opened the breaker; None once it closes again."""
        return self._open_cause

    def seconds_until_probe(self) -> float:
        """While OPEN, seconds until the next acquire may probe; 0 otherwise."""
        with self._lock:
            return self._seconds_until_probe_locked()

    def is_rejecting(self) -> bool:
        """True if an acquire right now would fail fast because the breaker is OPEN (no side effects)."""
        with self._lock:
            return self._state is BreakerState.OPEN and self._seconds_until_probe_locked() > 0

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(server={self.server!r}, state={self._state.value}, "
            f"consecutive_failures={self._consecutive_failures})"
        )

    # -- the API used per attempt ------------------------------------------------------------

    def acquire(self, label: str = "") -> Permit:
        """Admit one attempt or raise :class:`CircuitOpenError` at once (no I/O, no await)."""
        with self._lock:
            if self._state is BreakerState.OPEN:
                if self._seconds_until_probe_locked() > 0:
                    raise self._open_error(label)
                self._transition(BreakerState.HALF_OPEN, reason=f"recovery timeout of {self._recovery_s()}s elapsed")
            if self._state is BreakerState.HALF_OPEN:
                if self._probes_in_flight >= self.config.half_open_max_calls:
                    raise self._open_error(label)
                self._probes_in_flight += 1
                return Permit(self, self._generation, True, label)
            return Permit(self, self._generation, False, label)

    # -- internals (all called with or taking self._lock) ----------------------------------

    def _on_permit_done(self, generation: int, probe: bool, success: bool | None, error_type: str | None) -> None:
        with self._lock:
            if generation != self._generation:
                return  # stale: taken before the last transition, its slot no longer exists
            if probe:
                self._probes_in_flight -= 1
            if success is None:
                return
            if self._state is BreakerState.CLOSED:
                if success:
                    self._consecutive_failures = 0
                else:
                    self._consecutive_failures += 1
                    if self._consecutive_failures >= self.config.failure_threshold:
                        self._open(f"{self._consecutive_failures} consecutive failures", error_type)
            elif self._state is BreakerState.HALF_OPEN:
                if success:
                    self._half_open_successes += 1
                    if self._half_open_successes >= self.config.success_threshold:
                        self._transition(BreakerState.CLOSED, reason=f"{self._half_open_successes} successful probe(s)")
                else:
                    self._open("a probe failed in half-open", error_type)

    def _open(self, reason: str, cause: str | None) -> None:
        self._opened_at = self._clock()
        self._open_cause = cause
        self._transition(BreakerState.OPEN, reason=f"{reason}, last: {cause}" if cause else reason)

    def _transition(self, new: BreakerState, *, reason: str) -> None:
        old = self._state
        self._state = new
        self._generation += 1
        self._probes_in_flight = 0
        self._half_open_successes = 0
        if new is not BreakerState.OPEN:
            # CLOSED starts counting afresh; HALF_OPEN ignores the count (one failure reopens).
            self._consecutive_failures = 0
        if new is BreakerState.CLOSED:
            self._open_cause = None
        self._set_gauge(new)
        if new is BreakerState.OPEN:
            log.warning(
                "circuit breaker for %s: %s -> open (%s); failing fast, next probe in %.1fs",
                self.server,
                old.value,
                reason,
                self._recovery_s(),
            )
        elif new is BreakerState.HALF_OPEN:
            log.info("circuit breaker for %s: open -> half_open (%s); probing", self.server, reason)
        else:
            log.info("circuit breaker for %s: %s -> closed (%s)", self.server, old.value, reason)

    def _set_gauge(self, state: BreakerState) -> None:
        CIRCUIT_BREAKER_STATE.labels(server=self.server).set(BREAKER_STATE_VALUES[state.value])

    def _recovery_s(self) -> float:
        return self.config.recovery_timeout_s

    def _seconds_until_probe_locked(self) -> float:
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._recovery_s() - self._clock())

    def _open_error(self, label: str) -> CircuitOpenError:
        # Built on the fail-fast path: string formatting only, no I/O and no logging
        # (a flood of rejected calls would otherwise flood the log).
        if self._state is BreakerState.OPEN:
            detail = f"state=open, next probe in {self._seconds_until_probe_locked():.1f}s"
        else:
            detail = (
                f"state=half_open, all {self.config.half_open_max_calls} probe slot(s) busy, "
                "retry when the probes finish"
            )
        cause = f", opened by {self._open_cause}" if self._open_cause else ""
        return CircuitOpenError(
            f"circuit breaker open for {self.server}{cause}, request {label or '-'} not sent ({detail})",
            server=self.server,
            label=label,
            first_cause=self._open_cause,
        )


# -- one breaker per server URL per process ------------------------------------------------

_BREAKERS: dict[str, CircuitBreaker] = {}
_BREAKERS_LOCK = threading.Lock()


def breaker_for(
    server_url: str, config: CircuitBreakerConfig | None = None, *, clock: Clock | None = None
) -> CircuitBreaker:
    """The process-wide breaker of ``server_url``, created on first use with ``config`` (and ``clock``: a test
    that registers it first drives its recovery timeout with a fake clock).

    Later calls return the same breaker whatever ``config`` they pass: every
    client to one server must see one state. A differing config is logged.
    """
    key = server_url.rstrip("/")
    with _BREAKERS_LOCK:
        breaker = _BREAKERS.get(key)
        if breaker is None:
            breaker = _BREAKERS[key] = CircuitBreaker(key, config, clock=clock or time.monotonic)
        elif config is not None and config != breaker.config:
            log.warning("circuit breaker for %s already exists; keeping its first configuration", key)
        return breaker


def reset_breakers() -> None:
    """Forget every registered breaker (tests; a new breaker starts CLOSED)."""
    with _BREAKERS_LOCK:
        _BREAKERS.clear()
