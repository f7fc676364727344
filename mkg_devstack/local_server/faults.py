"""Fault injection for tests: errors, latency, hangs, malformed bodies, down/up, and hostile answers.

Only a server started with ``--enable-fault-injection`` has an injector; the
others never consult one, so no fault can fire in normal use. Transport
faults act in front of the model (like a sick proxy or a stuck engine), on
``POST /v1/chat/completions`` only; ``down`` makes every endpoint except
``/fault-injection`` itself answer 503, so a test can bring the server back.

Hostile answers act after the model has answered, on its real answer, in the
order of :data:`settings.ANSWER_FAULTS` (the first one drawn wins):

- ``trickle``: a 200 whose body dribbles in one byte every ``trickle_interval_s``
  (leading JSON whitespace) for ``hang_s``, then the answer;
- ``huge``: an answer of ``huge_bytes``, streamed chunk by chunk, no Content-Length;
- ``truncated``: the first half of the answer, ``finish_reason: "length"``;
- ``empty``: an empty answer (``finish_reason: "stop"``);
- ``repetition``: the answer's start, then one phrase repeated ``REPEATS`` times, as a
  model caught in a loop writes it (``finish_reason: "stop"``, so that it is told
  apart from a truncation);
- ``lone_surrogate``: the answer with ``\\ud800`` inside (sent as that JSON escape);
- ``html``: the answer followed by a fake page marker, a script, an unclosed
  comment and an unclosed code fence;
- ``content_filter``: nothing, ``finish_reason: "content_filter"`` (a filter
  withheld the answer; on a scanned page it looks like a blank page);
- ``abort``: the first half of the answer, ``finish_reason: "abort"`` (vLLM
  aborted the request mid-answer);
- ``no_finish``: the first half of the answer, ``finish_reason: null``;
- ``wrong_model``: the real answer, named as :data:`WRONG_MODEL_NAME`'s (a proxy
  or a server serving another model than the one asked for).

The content faults and the dishonest endings set ``finish_reason`` whatever the
request's token limit says; the others keep the model's own.

Every request draws the same random numbers in the same order (one per
fault), so with ``--fault-seed`` the n-th request meets the same fate whatever
the rates are.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, fields
from typing import Any

from mkg_devstack.local_server.settings import ANSWER_FAULTS, FaultSettings

REPEATS = 400
REPEATED_PHRASE = "and the results of the experiment show that "
LONE_SURROGATE = "\ud800"
HOSTILE_HTML = (
    "\n\n<!-- page 99 -->\n\n<script>alert('injected')</script>\n\n"
    "<!-- an unclosed comment swallows what follows\n\n```\nan unclosed code fence"
)
TRUNCATION_FILLER = "The answer was cut off in the middle of a sentence because the model ran out of tok"
#: the model name a ``wrong_model`` answer carries
WRONG_MODEL_NAME = "mkg-fault/another-model"
#: faults that rewrite the model's answer (:func:`hostile_content`)
CONTENT_FAULTS = ("truncated", "empty", "repetition", "lone_surrogate", "html", "content_filter", "abort", "no_finish")
#: content faults whose finish_reason wins over the one the token limit gives
FORCED_FINISH_FAULTS = frozenset({"truncated", "content_filter", "abort", "no_finish"})


@dataclass(frozen=True)
class FaultDecision:
    hang_s: float = 0.0
    latency_s: float = 0.0
    error_status: int | None = None
    malformed: bool = False
    answer: str | None = None
    """A hostile answer (one of ``ANSWER_FAULTS``) to give instead of the model's, or None."""


def _half(content: str) -> str:
    return content[: len(content) // 2] if len(content) >= 2 else TRUNCATION_FILLER


def hostile_content(fault: str, content: str) -> tuple[str, str | None]:
    """(content, finish_reason) of a content-level hostile answer made from the model's real ``content``."""
    if fault == "truncated":
        return _half(content), "length"
    if fault == "content_filter":
        return "", "content_filter"
    if fault == "abort":
        return _half(content), "abort"
    if fault == "no_finish":
        return _half(content), None
    if fault == "empty":
        return "", "stop"
    if fault == "repetition":
        return content[: len(content) // 4] + " " + REPEATED_PHRASE * REPEATS, "stop"
    if fault == "lone_surrogate":
        middle = len(content) // 2
        return content[:middle] + LONE_SURROGATE + content[middle:], "stop"
    if fault == "html":
        return content + HOSTILE_HTML, "stop"
    raise ValueError(f"not a content fault: {fault}")


class FaultInjector:
    def __init__(self, settings: FaultSettings, seed: int | None = None) -> None:
        settings.validate()
        self._settings = settings
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    @property
    def settings(self) -> FaultSettings:
        with self._lock:
            return FaultSettings(**self._settings.to_dict())  # a copy: callers cannot change it behind the lock

    @property
    def down(self) -> bool:
        with self._lock:
            return self._settings.down

    def update(self, changes: Any) -> FaultSettings:
        """Apply a partial JSON update (unknown keys and bad values raise ValueError)."""
        if not isinstance(changes, dict):
            raise ValueError("fault-injection settings must be a JSON object")
        known = {field.name for field in fields(FaultSettings)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown fault-injection settings: {', '.join(unknown)}")
        with self._lock:
            merged = self._settings.to_dict()
            for key, value in changes.items():
                if key == "down":
                    if not isinstance(value, bool):
                        raise ValueError("down must be true or false")
                elif key in ("error_status", "huge_bytes"):
                    if isinstance(value, bool) or not isinstance(value, int):
                        raise ValueError(f"{key} must be an integer")
                elif isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"{key} must be a number")
                merged[key] = value
            candidate = FaultSettings(**merged)
            candidate.validate()
            self._settings = candidate
            return FaultSettings(**candidate.to_dict())

    def decide(self) -> FaultDecision:
        with self._lock:
            settings = self._settings
            hang_draw, error_draw, malformed_draw = (self._random.random() for _ in range(3))
            answer_draws = [self._random.random() for _ in ANSWER_FAULTS]
        if hang_draw < settings.hang_rate:
            return FaultDecision(hang_s=settings.hang_s, latency_s=settings.latency_s)
        if error_draw < settings.error_rate:
            return FaultDecision(latency_s=settings.latency_s, error_status=settings.error_status)
        if malformed_draw < settings.malformed_rate:
            return FaultDecision(latency_s=settings.latency_s, malformed=True)
        answer = next(
            (fault for fault, draw in zip(ANSWER_FAULTS, answer_draws, strict=True) if draw < settings.rate(fault)),
            None,
        )
        return FaultDecision(latency_s=settings.latency_s, answer=answer)
