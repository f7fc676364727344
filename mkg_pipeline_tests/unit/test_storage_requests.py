"""The retry policy and error translation every S3 request of the storage layer goes through.

Moto answers every request, so a transient failure cannot be provoked there on demand: these tests drive
``_s3_request`` with a sender that fails as botocore does, and a recording sleep (no real waiting).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError

from mkg_pipeline.storage import _s3_request


def _client_error(code: str, status: int, message: str = "") -> ClientError:
    response = {"Error": {"Code": code, "Message": message or code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "GetObject")  # type: ignore[arg-type]


def _run(failures: list[BaseException], attempts: int = 5) -> tuple[Any, int, list[float]]:
    """Send through ``_s3_request``: each call raises the next of ``failures``, then answers "ok"."""
    calls = 0
    slept: list[float] = []

    async def send() -> str:
        nonlocal calls
        calls += 1
        if calls <= len(failures):
            raise failures[calls - 1]
        return "ok"

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def main() -> Any:
        return await _s3_request(send, attempts=attempts, sleep=sleep)

    try:
        result: Any = asyncio.run(main())
    except Exception as exc:
        result = exc
    return result, calls, slept


def _closed() -> ConnectionClosedError:
    return ConnectionClosedError(endpoint_url="http://127.0.0.1:9/b/k")


def test_a_dropped_connection_is_sent_again_with_backoff() -> None:
    result, calls, slept = _run([_closed(), _closed()])
    assert (result, calls) == ("ok", 3)
    assert slept == pytest.approx([0.1, 0.17])  # s3fs's backoff: 0.1 s x 1.7^n


def test_slow_down_is_retried_until_the_attempts_run_out() -> None:
    slow = _client_error("SlowDown", 503, "Please reduce your request rate.")
    result, calls, slept = _run([slow] * 5, attempts=3)
    assert calls == 3 and len(slept) == 2
    assert isinstance(result, OSError) and result.__cause__ is slow


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_client_error("NoSuchKey", 404), FileNotFoundError),
        (_client_error("AccessDenied", 403), PermissionError),
        (_client_error("PreconditionFailed", 412), OSError),
    ],
)
def test_an_answer_is_translated_and_never_retried(error: ClientError, expected: type[Exception]) -> None:
    result, calls, slept = _run([error])
    assert calls == 1 and slept == []
    # The translated error keeps S3's answer as its cause: the storage layer reads 412s and "S3 answered" there.
    assert isinstance(result, expected) and result.__cause__ is error


def test_an_unreachable_endpoint_is_raised_as_is() -> None:
    # botocore already made its attempts (AWS_MAX_ATTEMPTS); s3fs's policy does not add more for a refusal.
    refused = EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/k")
    result, calls, _ = _run([refused])
    assert result is refused and calls == 1


def test_if_none_match_lost_reads_as_file_exists() -> None:
    lost = ClientError(
        {"Error": {"Code": "PreconditionFailed", "Condition": "If-None-Match"}, "ResponseMetadata": {}},  # type: ignore[typeddict-item]
        "PutObject",
    )
    result, _, _ = _run([lost])
    assert isinstance(result, FileExistsError)
