"""The guarded client of the VLM server: breaker, retries, in-flight bound, metrics.

Importing this package is cheap: the exceptions are plain Python and load at
once; the client (httpx, tenacity) and the breaker (prometheus-client,
pydantic config) load on first attribute access. Code that only catches
:class:`VLLMClientError` therefore never pays for the HTTP stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mkg_pipeline.vllm.errors import (
    CircuitOpenError,
    VLLMAuthError,
    VLLMClientError,
    VLLMConnectionError,
    VLLMRateLimitedError,
    VLLMRequestError,
    VLLMResponseError,
    VLLMServerError,
    VLLMTimeoutError,
)

if TYPE_CHECKING:
    from mkg_pipeline.vllm.breaker import BreakerState, CircuitBreaker, Permit, breaker_for, reset_breakers
    from mkg_pipeline.vllm.client import ChatResult, VLLMClient

# name -> submodule holding it, imported lazily by __getattr__
_LAZY = {
    "VLLMClient": "client",
    "ChatResult": "client",
    "CircuitBreaker": "breaker",
    "BreakerState": "breaker",
    "Permit": "breaker",
    "breaker_for": "breaker",
    "reset_breakers": "breaker",
}

__all__ = [
    "BreakerState",
    "ChatResult",
    "CircuitBreaker",
    "CircuitOpenError",
    "Permit",
    "VLLMAuthError",
    "VLLMClient",
    "VLLMClientError",
    "VLLMConnectionError",
    "VLLMRateLimitedError",
    "VLLMRequestError",
    "VLLMResponseError",
    "VLLMServerError",
    "VLLMTimeoutError",
    "breaker_for",
    "reset_breakers",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
