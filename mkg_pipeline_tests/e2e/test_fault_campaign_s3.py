"""Fault campaign (issue 9), case 2: S3 stops mid-ingest and mid-vlm, and comes back.

The pipeline reaches moto through a TCP proxy; ``down()`` refuses and resets every connection (moto keeps
its data), ``up()`` brings S3 back on the same port. The proxy also slows S3 down a little, so that the
step is visibly half-way when S3 goes. The run fails with one clear message or records failures; nothing
is half-recorded; the audit is clean once S3 is back; the re-run requests exactly the missing pages.

The vlm case also covers row 14: the documents had a complete status from an earlier run (another DPI);
the step that failed leaves them ``stale`` (never the earlier "complete"), and the re-run completes them.
"""

from __future__ import annotations

import time

import pytest

from mkg_pipeline_tests.e2e.campaign import Campaign, doc_id_of, report_row, tiny_pdf, wait_until

pytestmark = pytest.mark.e2e

#: the longest S3 stays away once the step is visibly half-way (not an assertion): S3 stays down until the
#: run has reacted (ended), then comes back.
OUTAGE_MAX_S = 40.0
#: botocore's attempts per S3 call (default 5, i.e. 3-8 s of retries against a dead endpoint): fewer here, so
#: that the outage reaches the step within seconds. The same code paths fail; only sooner.
S3_ATTEMPTS = "2"


def _outage(campaign: Campaign, join_thread: object) -> float:
    """S3 down until the run has ended (at most OUTAGE_MAX_S), then back; returns how long it was down."""
    campaign.proxy.down()
    started = time.monotonic()
    thread = join_thread.thread  # type: ignore[attr-defined]
    thread.join(timeout=OUTAGE_MAX_S)
    campaign.proxy.up()
    return time.monotonic() - started


def test_s3_down_mid_ingest(campaign: Campaign) -> None:
    files = {f"s3-ingest-{n}.pdf": tiny_pdf(f"s3 ingest {n}", 1 + n % 2) for n in range(6)}
    doc_pages = {doc_id_of(data): 1 + n % 2 for n, data in enumerate(files.values())}
    batch = campaign.new_batch(files)

    campaign.set_env(AWS_MAX_ATTEMPTS=S3_ATTEMPTS)
    campaign.proxy.delay_s = 0.1
    join = campaign.materialize_in_thread(batch)
    wait_until(
        lambda: 0 < sum(k.endswith(".pdf") for k in campaign.keys("raw/")) < len(files),
        "some documents in raw/, not all",
    )
    down_s = _outage(campaign, join)
    campaign.proxy.delay_s = 0
    result = join()
    view = campaign.view(result.run_id)
    # One clear message: what could not be recorded, that nothing is lost, what to run.
    assert list(view.step_failures) == ["raw_pdfs"], view.describe()
    message = view.step_failures["raw_pdfs"]
    assert "could not be recorded" in message and "is S3 reachable?" in message, message
    assert f"materialize raw_pdfs for batch {batch}" in message, message
    campaign.assert_records_whole()
    campaign.audit(pending=True)  # nothing lost, nothing half-recorded: each object recorded or still in incoming/

    rerun = campaign.rerun_and_account(batch, doc_pages)
    assert not campaign.keys("incoming/")
    report_row("S3 down mid-ingest (raw_pdfs)", rerun, view.describe(), f"S3 down {down_s:.0f} s")


def test_s3_down_mid_vlm_leaves_status_stale(campaign: Campaign) -> None:
    files = {f"s3-vlm-{n}.pdf": tiny_pdf(f"s3 vlm {n}", 2) for n in range(3)}
    doc_pages = {doc_id_of(data): 2 for data in files.values()}
    batch = campaign.new_batch(files)
    first = campaign.materialize(batch)
    assert first.success
    for doc_id in doc_pages:
        assert campaign.storage.get_json(campaign.storage.vlm_status_key(doc_id))["state"] == "complete"

    # Another image size: new page images, so every page is new work for the VLM; each answer takes a second.
    campaign.set_env(MKG_PAGE_IMAGES__PAGE_MARKDOWN__LONGEST_SIDE_PX="600", AWS_MAX_ATTEMPTS=S3_ATTEMPTS)
    assert campaign.materialize(batch, "parsed_pages").success
    campaign.server.set_faults(latency_s=1.0)
    campaign.proxy.delay_s = 0.05
    join = campaign.materialize_in_thread(batch, "vlm_outputs,quality_baseline_diffs")
    wait_until(lambda: campaign.pages_without_result(doc_pages) < 6, "the first page result of the new images")
    down_s = _outage(campaign, join)
    campaign.proxy.delay_s = 0
    campaign.server.set_faults(latency_s=0.0)
    result = join()
    view = campaign.view(result.run_id)
    assert list(view.step_failures) == ["vlm_outputs"], view.describe()
    assert "could not be recorded" in view.step_failures["vlm_outputs"], view.describe()

    # Row 14: no status claims the earlier run's result is current.
    states = {}
    for doc_id in doc_pages:
        status = campaign.storage.get_json(campaign.storage.vlm_status_key(doc_id))
        assert status["run_id"] == result.run_id, status
        states[doc_id] = status["state"]
    assert "stale" in states.values() or any(s in {"partial", "failed"} for s in states.values()), states
    campaign.assert_records_whole()
    campaign.audit(pending=True)

    rerun = campaign.rerun_and_account(batch, doc_pages)
    report_row(
        "S3 down mid-vlm (vlm_outputs) + row 14 (failed step leaves status stale)",
        rerun,
        view.describe(),
        f"S3 down {down_s:.0f} s; statuses after the failed step: {sorted(states.values())}",
    )
