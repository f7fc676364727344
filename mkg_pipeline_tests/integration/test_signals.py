"""The suite's processes stop on SIGTERM even when pytest was started with SIGINT ignored.

A background job of a non-interactive shell (``make test &``, many CI runners) starts with SIGINT
ignored; Dagster's in-process runs map SIGTERM to SIGINT's handler, so without the root conftest's
``pytest_configure`` every process started afterwards (Dagster's per-step ``tail -F``, moto, a daemon)
would ignore SIGTERM, and each stop would wait out its timeout.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator

import pytest

from mkg_pipeline_tests.conftest import pytest_configure


@pytest.fixture
def started_in_the_background() -> Iterator[None]:
    """SIGINT ignored, as a background job inherits it; both handlers restored afterwards."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def test_a_process_started_after_a_dagster_run_stops_on_sigterm(
    started_in_the_background: None, pytestconfig: pytest.Config
) -> None:
    from dagster._utils.interrupts import capture_interrupts

    pytest_configure(pytestconfig)
    with capture_interrupts():  # what every in-process Dagster run on the main thread does
        pass
    child = subprocess.Popen(["sleep", "30"])
    try:
        child.terminate()
        assert child.wait(timeout=10) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()
