"""The vlm stage's run-log progress line shows the rate and ETA in the demo's progress-bar wording
(mkg_pipeline.progress.rate_and_eta), over the pages the server works on: cached pages are neither."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from mkg_pipeline.stages import vlm_scheduler
from mkg_pipeline.stages.vlm import VLMSummary
from mkg_pipeline.stages.vlm_run import RunContext
from mkg_pipeline.stages.vlm_scheduler import PageScheduler


def _progress_lines(summary: VLMSummary, elapsed_s: float, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(vlm_scheduler, "SUMMARY_EVERY_S", 0.0)
    lines: list[str] = []
    gate = SimpleNamespace(limit=4, in_flight=2, waiting=0)
    # report_progress reads only the summary, the gate and the bytes held
    run = RunContext(None, None, summary, model="m", run_id="r", force_refresh=False, progress=lines.append)  # type: ignore[arg-type]
    batch = PageScheduler(run, gate, None, None)  # type: ignore[arg-type]

    async def run() -> None:
        # started elapsed_s ago: the line's rate and ETA are then known (a few ms of drift round away)
        task = asyncio.create_task(batch.report_progress(time.monotonic() - elapsed_s))
        while not lines:
            await asyncio.sleep(0)
        task.cancel()

    asyncio.run(run())
    return lines


def test_progress_line_has_rate_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    summary = VLMSummary(
        engine="e", model="m", server_url="http://x", pages_total=120, cached=20, processed=45, failed=5
    )
    (line, *_) = _progress_lines(summary, 100.0, monkeypatch)
    # 50 pages worked on (45 answered, 5 failed) in 100 s, 50 of the 100 uncached pages left: 1m40s
    assert "45 processed, 20 cached, 5 failed of 120 pages seen; 0.50 pages/s, ETA 1m40s;" in line, line


def test_progress_line_on_a_slow_server_and_before_the_first_page(monkeypatch: pytest.MonkeyPatch) -> None:
    slow = VLMSummary(engine="e", model="m", server_url="http://x", pages_total=13, processed=3)
    assert "3.0 pages/min, ETA 3m20s;" in _progress_lines(slow, 60.0, monkeypatch)[0]
    none_yet = VLMSummary(engine="e", model="m", server_url="http://x", pages_total=8)
    assert "-- pages/s, ETA --;" in _progress_lines(none_yet, 30.0, monkeypatch)[0]
