"""Fault campaign (issue 9), cases 3 and 4: two runs of one partition at once; eight batches at once.

Two ``dagster asset materialize`` processes of the same batch bypass Dagster's queue (as CI and shells do):
the batch lease lets one work at a time; the other waits for the lease or stops with a message naming
the holder. Never a page requested twice. Eight partitions materialized at once (threads in this process,
each its own run): all complete, one request per page.
"""

from __future__ import annotations

import pytest

from mkg_pipeline_tests.e2e.campaign import Campaign, Rerun, doc_id_of, report_row, tiny_pdf

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
