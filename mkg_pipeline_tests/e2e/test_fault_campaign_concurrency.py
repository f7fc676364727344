"""Fault campaign (issue 9), cases 3 and 4: two runs of one partition at once; eight batches at once.

Two ``dagster asset materialize`` processes of the same batch bypass Dagster's queue (as CI and shells do):
the batch lease lets one work at a time; the other waits for the lease or stops with a message naming
the holder. Never a page requested twice. Eight partitions materialized at once (threads in this process,
each its own run): all complete, one request per page.
"""

from __future__ import annotations

import os
import signal
from datetime import UTC, datetime

import pytest

from mkg_pipeline_tests.e2e.campaign import Campaign, Rerun, doc_id_of, report_row, tiny_pdf, wait_until

pytestmark = pytest.mark.e2e


def test_two_runs_of_one_partition_at_once(campaign: Campaign) -> None:
    files = {f"twice-{n}.pdf": tiny_pdf(f"twice {n}", pages) for n, pages in enumerate((2, 1))}
    doc_pages = {doc_id_of(data): pages for data, pages in zip(files.values(), (2, 1), strict=True)}
    batch = campaign.new_batch(files)
    campaign.server.set_faults(latency_s=2.0)  # the vlm step holds the batch for a while
    campaign.settle()
    before = campaign.requests()

    runs = [campaign.start_cli(batch), campaign.start_cli(batch)]
    codes = [run.wait() for run in runs]
    campaign.server.set_faults(latency_s=0.0)
    campaign.settle()
    requested = campaign.requests() - before

    run_ids = campaign.run_ids(batch)
    assert len(run_ids) == 2
    views = [campaign.view(run_id) for run_id in run_ids]
    assert any(v.status == "SUCCESS" for v in views), [v.describe() for v in views]
    for view, other in ((views[0], views[1]), (views[1], views[0])):
        for step, message in view.step_failures.items():  # the one that did not get the batch says who has it
            assert f"is being processed by run {other.run_id}" in message, (step, message)
    assert sorted(codes) == sorted(0 if v.status == "SUCCESS" else 1 for v in views), codes
    total = sum(doc_pages.values())
    assert sum(v.vlm["requests"] for v in views if v.vlm) == total
    assert requested == total, f"{requested} requests for {total} pages: some page was requested twice"
    campaign.audit()

    rerun = campaign.rerun_and_account(batch, doc_pages)
    assert rerun.missing == 0
    report_row(
        "two runs of one partition at once",
        rerun,
        " | ".join(v.describe() for v in views),
        f"{requested} requests for {total} pages over both runs",
    )


def test_eight_batches_at_once(campaign: Campaign) -> None:
    batches, doc_pages = [], {}
    for n in range(8):
        data = tiny_pdf(f"concurrent {n}", 1)
        batches.append(campaign.new_batch({f"concurrent-{n}.pdf": data}))
        doc_pages[doc_id_of(data)] = 1
    campaign.settle()
    before = campaign.requests()

    runs = [campaign.start_cli(batch) for batch in batches]
    codes = [run.wait() for run in runs]
    views = [campaign.view(run_id) for batch in batches for run_id in campaign.run_ids(batch)]
    assert codes == [0] * 8 and len(views) == 8, [v.describe() for v in views]
    assert all(v.status == "SUCCESS" for v in views), [v.describe() for v in views]
    campaign.settle()
    requested = campaign.requests() - before
    assert sum(v.vlm["requests"] for v in views if v.vlm) == len(doc_pages)
    assert requested == len(doc_pages), f"{requested} requests for {len(doc_pages)} pages"
    campaign.audit()

    # Re-runs: nothing is missing, nothing is requested.
    reruns = [
        campaign.rerun_and_account(batch, {d: 1}, "vlm_outputs") for batch, d in zip(batches, doc_pages, strict=True)
    ]
    assert sum(r.requested for r in reruns) == 0
    report_row(
        "8 concurrent batches",
        Rerun(reruns[0].view, missing=0, requested=0, total=len(doc_pages)),
        f"8 runs {sorted({v.status for v in views})}; re-runs requested 0 of {len(doc_pages)} pages",
        f"{requested} requests for {len(doc_pages)} pages",
    )


def test_a_run_paused_past_its_lease_stops_once_another_took_the_batch(campaign: Campaign) -> None:
    """Row 2, the stalled holder: run A is frozen (SIGSTOP: a paused VM or container, a process stopped in a
    debugger) for longer than the lease TTL, run B takes the expired lease over and does the batch, then A
    wakes up. A must learn that it lost the batch before it starts another page: only the pages it had
    already started when it froze are requested twice (with one request at a time: the one in flight and the
    two the stage fetches ahead, waiting for the limiter), never the rest of the batch."""
    pages = 10
    started_ahead = 1 + 2  # the limit (1) and the stage's look-ahead (max(2, limit // 8))
    data = tiny_pdf("paused holder", pages)
    doc_id = doc_id_of(data)
    batch = campaign.new_batch({"paused-holder.pdf": data})
    assert campaign.materialize(batch, "raw_pdfs,parsed_pages").success
    # One page at a time, each answer taking half a second: A is always half-way through when it freezes.
    campaign.set_env(MKG_VLLM__ADAPTIVE="false", MKG_VLLM__MIN_IN_FLIGHT="1", MKG_VLLM__MAX_IN_FLIGHT="1")
    campaign.server.set_faults(latency_s=0.5)
    campaign.settle()
    before = campaign.requests()

    a = campaign.start_cli(batch, "vlm_outputs")
    wait_until(lambda: campaign.keys(campaign.storage.vlm_page_prefix(doc_id)), "run A stored a page", run=a)
    os.killpg(a.process.pid, signal.SIGSTOP)
    try:
        (run_a,) = campaign.run_ids(batch)[1:]
        lease_key = campaign.storage.lease_key(batch)
        wait_until(
            lambda: datetime.fromisoformat(campaign.storage.get_json(lease_key)["expires_at"]) < datetime.now(UTC),
            "run A's lease expired while it is frozen",
        )
        join_b = campaign.materialize_in_thread(batch, "vlm_outputs")
        wait_until(lambda: campaign.storage.get_json(lease_key)["run_id"] != run_a, "run B took the batch over")
    finally:
        os.killpg(a.process.pid, signal.SIGCONT)
    view_b = campaign.view(join_b().run_id)
    a.wait()
    view_a = campaign.view(run_a)
    campaign.server.set_faults(latency_s=0.0)
    campaign.settle()
    requested = campaign.requests() - before

    assert view_b.status == "SUCCESS", view_b.describe()
    assert requested <= pages + started_ahead, f"{requested} requests for {pages} pages: A went on after losing it"
    assert view_a.status == "FAILURE", view_a.describe()
    assert "no longer holds the lease" in view_a.step_failures.get("vlm_outputs", ""), view_a.describe()
    campaign.audit()
    rerun = campaign.rerun_and_account(batch, {doc_id: pages}, "vlm_outputs")
    report_row(
        "a run frozen past its lease TTL, another takes over, the first wakes up",
        rerun,
        f"A: {view_a.describe()} | B: {view_b.describe()}",
        f"{requested} requests for {pages} pages (the pages A had started when it froze are asked twice)",
    )
