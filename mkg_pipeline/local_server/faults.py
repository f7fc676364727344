"""Fault injection for tests: errors, latency, hangs, malformed bodies, down/up.

Only a server started with ``--enable-fault-injection`` has an injector; the
others never consult one, so no fault can fire in normal use. Faults act in
front of the model (like a sick proxy or a stuck engine), on
``POST /v1/chat/completions`` only; ``down`` makes every endpoint except
``/fault-injection`` itself answer 503, so a test can bring the server back.

Every request draws the same three random numbers in the same order, so with
``--fault-seed`` the n-th request meets the same fate whatever the rates are.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, fields
from typing import Any

from mkg_pipeline.local_server.settings import FaultSettings


@dataclass(frozen=True)
class FaultDecision:
    hang_s: float = 0.0
    latency_s: float = 0.0
    error_status: int | None = None
    malformed: bool = False


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
        known = {field.name: field.type for field in fields(FaultSettings)}
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ValueError(f"unknown fault-injection settings: {', '.join(unknown)}")
        with self._lock:
            merged = self._settings.to_dict()
            for key, value in changes.items():
                if key == "down":
                    if not isinstance(value, bool):
                        raise ValueError("down must be true or false")
                elif key == "error_status":
                    if isinstance(value, bool) or not isinstance(value, int):
                        raise ValueError("error_status must be an integer")
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
        if hang_draw < settings.hang_rate:
            return FaultDecision(hang_s=settings.hang_s, latency_s=settings.latency_s)
        if error_draw < settings.error_rate:
            return FaultDecision(latency_s=settings.latency_s, error_status=settings.error_status)
        return FaultDecision(latency_s=settings.latency_s, malformed=malformed_draw < settings.malformed_rate)
