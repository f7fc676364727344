"""Fault campaign (issue 21), records that prove themselves (rows 4, 5) and memory bound by bytes (row 6).

Corrupted records, written behind the pipeline's back into moto: a page result truncated to half its
bytes, a garbage ``status.json``, a ``[]`` status, another page's record under a page's key, and a
corrupt page manifest. After each, the audit names exactly the harm (and the command that repairs it),
a plain re-run requests exactly the pages whose result does not prove itself, never blames S3, and the
audit is clean again.

Giant pages: a document of 14,400 pt pages covered by noise (rendered at the 40 Mpx cap, about 33 MB of
PNG each) goes through ``vlm_outputs`` as a ``dagster asset materialize`` process while the server is
slow (so the limiter would have many pages in flight), with the step's memory budget set; the process's
RSS is sampled from /proc, and its peak must stay under the budget plus the process's own overhead.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from mkg_pipeline_tests.e2e.campaign import WAIT_S, Campaign, doc_id_of, report_row, tiny_pdf
from mkg_pipeline_tests.fixtures.giant_pages import giant_pages_pdf

pytestmark = pytest.mark.e2e

#: giant pages per run: 100 to reproduce the issue's figure (MKG_CAMPAIGN_GIANT_PAGES=100, about 10 minutes
#: on 2 cores), fewer in `make test`: the bound holds or not with any count whose pages exceed the budget.
GIANT_PAGES = int(os.environ.get("MKG_CAMPAIGN_GIANT_PAGES", "10"))
#: the vlm step's page budget in this case (workers.vlm_page_memory_mb): 4 giant pages' worth of bytes
#: (MKG_CAMPAIGN_GIANT_BUDGET_MB=1536 measures the default)
GIANT_BUDGET_MB = int(os.environ.get("MKG_CAMPAIGN_GIANT_BUDGET_MB", "320"))
#: what the vlm_outputs process holds besides its pages in flight, measured: 157 MiB with small pages
#: (test_small_pages_overhead: Python, Dagster, httpx, s3fs/aiobotocore, the instance), plus one page's
#: transient copies while its request body is built (base64 and body of a 33 MB PNG: 88 MiB) and the
#: buffers of the S3 GETs of the admitted pages' PNGs. Measured peaks: 594 MiB for 10 giant pages under
#: a 320 MiB budget (313 MiB admitted: 281 MiB besides), 1,978 MiB for 100 under the default 1,536 MiB
#: (1,487 MiB admitted: 491 MiB besides). Fixed, whatever the number of pages; without the byte budget
#: 10 giant pages peaked at 1,776 MiB.
PROCESS_OVERHEAD_MB = 600


def _doc_pages(files: dict[str, bytes], pages: int = 1) -> dict[str, int]:
    return {doc_id_of(data): pages for data in files.values()}


def _rerun(campaign: Campaign, batch: str, doc_pages: dict[str, int], expected_requests: int) -> Any:
    """A plain re-run: it succeeds, requests exactly ``expected_requests`` pages, every document complete,
    the audit clean."""
    campaign.settle()
    before = campaign.requests()
    result = campaign.materialize(batch)
    view = campaign.view(result.run_id)
    assert result.success, view.describe()
    requested = campaign.requests() - before
    assert requested == expected_requests, (requested, view.vlm)
    assert view.vlm is not None and view.vlm["pages_processed"] == expected_requests, view.vlm
    assert campaign.pages_without_result(doc_pages) == 0
    for doc_id, pages in doc_pages.items():
        status = campaign.storage.get_json(campaign.storage.vlm_status_key(doc_id))
        assert (status["state"], status["pages_done"]) == ("complete", pages), status
    campaign.assert_records_whole()
    campaign.audit()
    return view, requested


def _page_key(campaign: Campaign, doc_id: str, n: int) -> str:
    (key,) = [
        k for k in campaign.keys(campaign.storage.vlm_page_prefix(doc_id)) if k.split("/")[-1].startswith(f"{n}.")
    ]
    return key


def _findings(campaign: Campaign) -> list[tuple[str, str | None, str]]:
    from mkg_pipeline.audit import audit_bucket

    report = audit_bucket(campaign.storage, campaign.identity())
    return sorted((f.kind, f.doc_id, f.action) for f in report.findings)


def test_corrupted_records_are_named_by_the_audit_and_redone_by_a_plain_rerun(campaign: Campaign) -> None:
    files = {f"records-{n}.pdf": tiny_pdf(f"records {n}", 2) for n in range(4)}
    doc_pages = _doc_pages(files, 2)
    truncated, garbage, empty_list, wrong_key = list(doc_pages)
    batch = campaign.new_batch(files)
    assert campaign.materialize(batch).success
    campaign.audit()
    s3 = campaign.storage

    # Row 4: half of page 1's result.
    key = _page_key(campaign, truncated, 1)
    data = s3.get_bytes(key)
    s3.put_bytes(key, data[: len(data) // 2])
    # Row 5: a garbage status, and [] as a status.
    s3.put_bytes(s3.vlm_status_key(garbage), b"\x00garbage\xff")
    s3.put_bytes(s3.vlm_status_key(empty_list), b"[]")
    # A record under the wrong key: page 1's result copied over page 2's.
    s3.put_bytes(_page_key(campaign, wrong_key, 2), s3.get_bytes(_page_key(campaign, wrong_key, 1)))

    findings = _findings(campaign)
    assert [(kind, doc) for kind, doc, _ in findings] == sorted(
        [
            ("page_result_unreadable", truncated),
            ("page_result_unreadable", wrong_key),
            ("unreadable_record", garbage),
            ("unreadable_record", empty_list),
        ]
    ), findings
    for _, doc_id, action in findings:
        assert f"--select vlm_outputs --partition {batch}" in action and doc_id in action, action
    audit = campaign.audit_cli()
    assert audit.returncode == 1 and "[page_result_unreadable]" in audit.stdout, audit.stdout

    view, requested = _rerun(campaign, batch, doc_pages, expected_requests=2)  # the two unproven pages
    assert json.loads(s3.get_bytes(_page_key(campaign, truncated, 1)))["page"] == 1
    assert json.loads(s3.get_bytes(_page_key(campaign, wrong_key, 2)))["page"] == 2
    report_row(
        "corrupted records: truncated page result, garbage status.json, [] status, a record under the wrong key",
        None,
        f"audit: {len(findings)} error(s) naming each record and `materialize vlm_outputs` for its document; "
        f"re-run {view.describe()}, {requested} page(s) requested",
        "0 lost, 0 duplicated: only the 2 pages without a valid result were requested again",
    )


def test_eight_garbage_statuses_in_ten_documents_do_not_make_s3_look_down(campaign: Campaign) -> None:
    files = {f"garbage-{n}.pdf": tiny_pdf(f"garbage status {n}", 1) for n in range(10)}
    doc_pages = _doc_pages(files)
    docs = list(doc_pages)
    batch = campaign.new_batch(files)
    assert campaign.materialize(batch).success
    s3 = campaign.storage
    for doc_id in docs[:8]:
        s3.put_bytes(s3.vlm_status_key(doc_id), b"garbage")
    for doc_id in docs[8:]:  # the two healthy documents have work to do
        s3.delete(_page_key(campaign, doc_id, 1))
        s3.delete(s3.vlm_status_key(doc_id))
    assert sum(kind == "unreadable_record" for kind, _, _ in _findings(campaign)) == 8

    view, requested = _rerun(campaign, batch, doc_pages, expected_requests=2)
    report_row(
        "8 garbage status.json in a 10-document batch",
        None,
        f"audit: 8 unreadable_record errors; re-run {view.describe()}, {requested} page(s) requested",
        "the 2 healthy documents were processed; S3 was never blamed",
    )


def test_a_corrupt_page_manifest_fails_its_document_only(campaign: Campaign) -> None:
    files = {f"manifest-{n}.pdf": tiny_pdf(f"manifest {n}", 1) for n in range(2)}
    doc_pages = _doc_pages(files)
    broken, healthy = list(doc_pages)
    batch = campaign.new_batch(files)
    assert campaign.materialize(batch, "raw_pdfs,parsed_pages").success
    s3 = campaign.storage
    s3.put_bytes(s3.page_manifest_key(broken), b"[]")

    result = campaign.materialize(batch, "vlm_outputs")
    view = campaign.view(result.run_id)
    assert not result.success
    message = view.step_failures["vlm_outputs"]
    assert broken in message and "page manifest" in message and "parsed_pages" in message, message
    assert "S3 reachable" not in message, message
    assert s3.get_json(s3.vlm_status_key(healthy))["state"] == "complete"  # the other document was processed
    (finding,) = _findings(campaign)
    assert finding[:2] == ("unreadable_record", broken) and "--select parsed_pages" in finding[2], finding

    config = {"ops": {"parsed_pages": {"config": {"doc_ids": [broken], "force": True}}}}
    assert campaign.materialize(batch, "parsed_pages", config).success
    view_after, requested = _rerun(campaign, batch, doc_pages, expected_requests=1)
    report_row(
        "a corrupt page manifest ([])",
        None,
        f"vlm_outputs: {view.describe()}; audit: unreadable_record naming parsed_pages with force; "
        f"after parsed_pages (force) the re-run {view_after.describe()}, {requested} page(s) requested",
        "the other document of the batch was processed",
    )


# ---- giant pages ----------------------------------------------------------------------------------------------


class RssSampler:
    """Peak RSS of a process and its descendants (each process on its own), sampled from /proc."""

    def __init__(self, pid: int, every_s: float = 0.02) -> None:
        self.pid, self.every_s = pid, every_s
        self.peak_kib: dict[int, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return max(self.peak_kib.values(), default=0) / 1024

    def _session(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[3]) == self.pid:  # session id: the run's own session (start_new_session)
                    pids.append(int(entry.name))
        return pids

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self._session():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), int(line.split()[1]))
            self.samples += 1
            self._stop.wait(self.every_s)


def _vlm_run_peak(campaign: Campaign, batch: str, budget_mb: int) -> tuple[float, Any]:
    """``vlm_outputs`` as a CLI process with this page budget; its peak RSS (MiB, largest process)."""
    run = campaign.start_cli(batch, "vlm_outputs", extra_env={"MKG_WORKERS__VLM_PAGE_MEMORY_MB": str(budget_mb)})
    with RssSampler(run.process.pid) as sampler:
        code = run.wait(max(WAIT_S, 20.0 * GIANT_PAGES))  # a CPU OCR server reads about a giant page in 4-10 s
    assert code == 0, run.tail()
    assert sampler.samples > 10, sampler.samples
    (run_id,) = campaign.run_ids(batch)[-1:]
    return sampler.peak_mib, campaign.view(run_id)


def test_small_pages_overhead(campaign: Campaign) -> None:
    """The vlm_outputs process's own memory, with pages of a few KB: the fixed overhead the bound allows."""
    files = {f"small-{n}.pdf": tiny_pdf(f"small {n}", 2) for n in range(3)}
    batch = campaign.new_batch(files)
    assert campaign.materialize(batch, "raw_pdfs,parsed_pages").success
    peak, view = _vlm_run_peak(campaign, batch, GIANT_BUDGET_MB)
    assert view.vlm is not None and view.vlm["pages_processed"] == 6, view.describe()
    print(f"vlm_outputs peak RSS with 6 small pages: {peak:.0f} MiB")
    assert peak < PROCESS_OVERHEAD_MB


@pytest.mark.timeout(max(600, 30 * GIANT_PAGES))  # rendering and reading a giant page take seconds each
def test_giant_pages_are_admitted_by_their_bytes(campaign: Campaign) -> None:
    pdf = giant_pages_pdf(GIANT_PAGES, noise_px=3072)
    doc_id = doc_id_of(pdf)
    batch = campaign.new_batch({"giant-pages.pdf": pdf})
    # The engine's image size caps a page at about 1 Mpx by default; a site that raises the cap (up to
    # 400 Mpx is allowed) must still be held by the byte budget: draw them at the render's own 40 Mpx limit.
    campaign.set_env(
        MKG_PAGE_IMAGES__PAGE_MARKDOWN__LONGEST_SIDE_PX="20000",
        MKG_PAGE_IMAGES__PAGE_MARKDOWN__MAX_PIXELS="400000000",
    )
    assert campaign.materialize(batch, "raw_pdfs,parsed_pages").success
    manifest = campaign.storage.get_json(campaign.storage.page_manifest_key(doc_id))
    assert len(manifest["pages"]) == GIANT_PAGES, manifest.get("failed_pages")
    sizes = [
        o.size for o in campaign.storage.list_objects(campaign.storage.page_prefix(doc_id)) if o.key.endswith(".png")
    ]
    assert min(sizes) > 30 * 2**20, sizes  # the pages are as heavy as the issue's

    # A slow server: the limiter would let many pages wait on it at once.
    campaign.server.set_faults(latency_s=2.0)
    peak, view = _vlm_run_peak(campaign, batch, GIANT_BUDGET_MB)
    campaign.server.set_faults(latency_s=0.0)
    assert view.vlm is not None and view.vlm["pages_processed"] == GIANT_PAGES, view.describe()
    print(
        f"vlm_outputs peak RSS with {GIANT_PAGES} giant pages ({sum(sizes) / 2**20:.0f} MiB of PNG), budget "
        f"{GIANT_BUDGET_MB} MiB: {peak:.0f} MiB (pages in flight held at most {view.vlm.get('peak_page_mib')} MiB)"
    )
    assert peak < GIANT_BUDGET_MB + PROCESS_OVERHEAD_MB, peak
    assert view.vlm["peak_page_mib"] <= GIANT_BUDGET_MB
    campaign.audit()
    report_row(
        f"{GIANT_PAGES} giant pages (14,400 pt, noise, 40 Mpx, {min(sizes) / 2**20:.0f} MB PNG each), slow server",
        None,
        f"{view.describe()}; vlm_outputs peak RSS {peak:.0f} MiB with a {GIANT_BUDGET_MB} MiB page budget",
        f"budget + overhead {GIANT_BUDGET_MB + PROCESS_OVERHEAD_MB} MiB",
    )
