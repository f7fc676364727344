"""Exceptions of the guarded vLLM client.

Every message names the server and the request (``label``: usually
``doc=<id> page=<n> step=<...>``) because the reader is an operator with a
failed Dagster step in front of them. The API key never appears in them.
"""

from __future__ import annotations


class VLLMClientError(Exception):
    """Base class: a request to the VLM server did not produce a usable answer."""

    #: short machine-readable reason, used as the ``error_type`` metric label and in failed-page records
    error_type: str = "client_error"
    #: whether a retry of the same request may succeed
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        server: str = "",
        label: str = "",
        status_code: int | None = None,
        first_cause: str | None = None,
    ) -> None:
        self.server = server
        self.label = label
        self.status_code = status_code
        #: the error_type of the first real failure behind this error (connect, timeout, server_error, ...):
        #: for a request that failed several times, its first failed attempt; for a fail-fast
        #: CircuitOpenError, the failure that opened the breaker. What a failed page is recorded with.
        self.first_cause: str = first_cause or self.error_type
        #: error_type of every attempt of the request, in order (set by the client when it gives up)
        self.attempt_errors: tuple[str, ...] = ()
        where = f" [server={server}" + (f" request={label}" if label else "") + "]" if server or label else ""
        super().__init__(f"{message}{where}")


class VLLMTimeoutError(VLLMClientError):
    """The server accepted the connection but did not answer in time."""

    error_type = "timeout"
    retryable = True


class VLLMConnectionError(VLLMClientError):
    """The server could not be reached (refused, reset, DNS)."""

    error_type = "connect"
    retryable = True


class VLLMServerError(VLLMClientError):
    """The server answered 5xx, or 429 (rate limited) after all retries."""

    error_type = "server_error"
    retryable = True


class VLLMRateLimitedError(VLLMServerError):
    """429 Too Many Requests; ``retry_after`` holds the server's hint in seconds, if any."""

    error_type = "rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: object) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


class VLLMRequestError(VLLMClientError):
    """The server refused the request (4xx other than 429): retrying cannot help."""

    error_type = "client_error"
    retryable = False


class VLLMAuthError(VLLMRequestError):
    """401/403: missing or wrong API key."""

    error_type = "auth"


class VLLMResponseError(VLLMClientError):
    """A 200 answer whose body is not a usable chat completion (malformed JSON, no choices)."""

    error_type = "malformed_response"
    retryable = True


class ResponseTooLargeError(VLLMClientError):
    """The answer grew past its cap (``max_tokens`` x a bound, or ``http_client.max_response_bytes``).

    Reading stopped at the cap, so a runaway answer never sits in memory; retrying would only
    produce it again, so this is not retried.
    """

    error_type = "response_too_large"
    retryable = False


class CircuitOpenError(VLLMClientError):
    """The circuit breaker is open: the call failed fast without any network I/O.

    ``first_cause`` names the real failure behind it (the error_type that opened the breaker, or
    the first failure of this request if it had one), so a page failing fast is recorded with it.
    """

    error_type = "circuit_open"
    retryable = False
