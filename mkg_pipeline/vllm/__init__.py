"""The guarded client of the VLM server: breaker, adaptive concurrency limit, retries, metrics."""

from __future__ import annotations

from mkg_pipeline.vllm.breaker import BreakerState, CircuitBreaker, Permit, breaker_for, reset_breakers
from mkg_pipeline.vllm.client import ChatResult, VLLMClient
from mkg_pipeline.vllm.errors import (
    CircuitOpenError,
    ResponseTooLargeError,
    VLLMAuthError,
    VLLMClientError,
    VLLMConnectionError,
    VLLMRateLimitedError,
    VLLMRequestError,
    VLLMResponseError,
    VLLMServerError,
    VLLMTimeoutError,
)
from mkg_pipeline.vllm.limiter import AdaptiveLimiter, limiter_for, reset_limiters

__all__ = [
    "AdaptiveLimiter",
    "BreakerState",
    "ChatResult",
    "CircuitBreaker",
    "CircuitOpenError",
    "Permit",
    "ResponseTooLargeError",
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
    "limiter_for",
    "reset_breakers",
    "reset_limiters",
]
