"""Fault campaign (issue 9), cases 5 and 6: hostile answers through the real server; the server killed mid-run.

Case 5 (issue 9 rows 5, 6, 7, 10, 11 and issue 10's validated answers): one batch, one document per
fault, each sent alone (``doc_ids``) while the local server gives that answer to every request:

- ``trickle`` (a body dripping one byte every 0.5 s, timeout 2 s): the page fails as ``timeout``;
- ``huge`` (50 MB, far over the answer cap): ``response_too_large``, reading stops at the cap;
- ``truncated`` / ``empty`` / ``repetition``: a recorded failure with that reason, nothing cached, the
  re-ask counted in ``requests``;
- ``lone_surrogate``: the page is stored with U+FFFD, nothing crashes;
- ``html`` (a fake ``<!-- page 99 -->``, ``<script>``, an unclosed comment and fence): ``document.md`` keeps
  every real page marker, and the following page visible; the raw answer is kept in the page record.

After each fault the audit is clean (the batch's other documents wait their turn) and, the fault off,
the re-run requests exactly the failed pages.

Case 5b (issue 21 rows 2 and 3, dishonest answers): one document per fault, each sent alone while the
local server gives that answer to every request:

- ``abort`` (half the answer), ``no_finish`` (half the answer, ``finish_reason: null``) and
  ``content_filter`` (nothing, ``finish_reason: "content_filter"``, on a scanned page, where an empty
  answer is a blank page): a recorded failure ``finish_abort``, ``finish_missing``,
  ``finish_content_filter``; nothing cached, the re-ask counted;
- ``wrong_model`` (the real answer, named ``mkg-fault/another-model``): ``model_mismatch``, nothing cached
  under the configured model's key;
- ``wrong_model`` again, with that name configured in ``vllm.served_model_aliases``: stored, its record
  names the model that answered, under the configured model's cache key.

After each fault the audit is clean but for the failed page (pending), and, the fault off, the re-run
requests exactly that page again and completes the document.

Case 6 (row 8, row 15): the server killed mid-run: every failed page records the first real cause
(connect, timeout, server_error), never ``circuit_open``; the run fails visibly (page_failure_rate)
while every finished page is kept; the re-run, once the server is back, requests exactly the rest.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from mkg_pipeline_tests.e2e.campaign import Campaign, doc_id_of, report_row, tiny_pdf, wait_until

pytestmark = pytest.mark.e2e

REAL_CAUSES = {"connect", "timeout", "server_error"}
HUGE_BYTES = 50_000_000
#: fault -> (server settings, pages of its document, reason of the failed page or None: stored)
HOSTILE: dict[str, tuple[dict[str, Any], int, str | None]] = {
    "trickle": ({"trickle_rate": 1.0, "trickle_interval_s": 0.5, "hang_s": 20.0}, 1, "timeout"),
    "huge": ({"huge_rate": 1.0, "huge_bytes": HUGE_BYTES}, 1, "response_too_large"),
    "truncated": ({"truncated_rate": 1.0}, 1, "truncated"),
    "empty": ({"empty_rate": 1.0}, 1, "empty"),
    "repetition": ({"repetition_rate": 1.0}, 1, "repetition"),
    "lone_surrogate": ({"lone_surrogate_rate": 1.0}, 1, None),
    "html": ({"html_rate": 1.0}, 2, None),
}
NO_FAULT = {f"{name}_rate": 0.0 for name in HOSTILE}


def _only(doc_id: str) -> dict[str, Any]:
    return {"ops": {"vlm_outputs": {"config": {"doc_ids": [doc_id]}}}}


def _check_html(campaign: Campaign, doc_id: str, preview: str) -> None:
    storage = campaign.storage
    markdown = storage.get_bytes(storage.document_md_key(doc_id)).decode()
    markers = [line for line in markdown.splitlines() if re.fullmatch(r"<!-- page \d+ -->", line)]
    assert markers == ["<!-- page 1 -->", "<!-- page 2 -->"], markdown
    assert "<!-- page 99 -->" not in markdown and "<script>" not in markdown, markdown
    # As a Markdown viewer shows it: without the real comments, no comment is left open and page 2 is visible.
    from markdown_it import MarkdownIt

    html = re.sub(r"<!--.*?-->", "", MarkdownIt("commonmark").render(markdown), flags=re.DOTALL)
    assert "<!--" not in html and "<script" not in html, html
    assert "page 2 of 2" in html, html
    for key in campaign.keys(storage.vlm_page_prefix(doc_id)):
        assert "<!-- page 99 -->" in storage.get_json(key)["raw_answer"]  # what the model said is kept
    assert "<script>" not in preview


def _check_lone_surrogate(campaign: Campaign, doc_id: str) -> None:
    storage = campaign.storage
    (key,) = campaign.keys(storage.vlm_page_prefix(doc_id))
    raw = storage.get_bytes(key).decode("utf-8")  # valid UTF-8
    record = storage.get_json(key)
    assert "\ufffd" in record["markdown"] and "\ud800" not in raw and "\\ud800" not in raw


def test_hostile_answers(campaign: Campaign) -> None:
    files = {f"hostile-{fault}.pdf": tiny_pdf(f"hostile {fault}", pages) for fault, (_, pages, _) in HOSTILE.items()}
    docs = {fault: doc_id_of(files[f"hostile-{fault}.pdf"]) for fault in HOSTILE}
    batch = campaign.new_batch(files)
    assert campaign.materialize(batch, "raw_pdfs,parsed_pages").success
    storage = campaign.storage

    for fault, (settings, pages, reason) in HOSTILE.items():
        doc_id = docs[fault]
        if fault == "trickle":  # a short total deadline per attempt, two attempts
            campaign.set_env(MKG_HTTP_CLIENT__TIMEOUT_S="2", MKG_HTTP_CLIENT__MAX_ATTEMPTS="2")
        campaign.server.set_faults(**settings)
        result = campaign.materialize(batch, "vlm_outputs", _only(doc_id))
        campaign.server.set_faults(**NO_FAULT)
        if fault == "trickle":
            campaign.set_env(MKG_HTTP_CLIENT__TIMEOUT_S="120", MKG_HTTP_CLIENT__MAX_ATTEMPTS="3")
        view = campaign.view(result.run_id)
        status = storage.get_json(storage.vlm_status_key(doc_id))
        assert view.vlm is not None, (fault, view.describe())
        if reason is None:  # answered and stored, made safe
            assert result.success and status["state"] == "complete", (fault, status, view.describe())
            if fault == "html":
                _check_html(campaign, doc_id, str(view.vlm["preview"]))
            else:
                _check_lone_surrogate(campaign, doc_id)
        else:  # a recorded failure with its own reason, nothing cached, and the run fails visibly
            assert not result.success and "page_failure_rate" in view.failed_checks, (fault, view.describe())
            (failed,) = status["failed_pages"]
            assert (failed["reason"], failed["attempts"], status["state"]) == (reason, 1, "failed"), (fault, status)
            assert not campaign.keys(storage.vlm_page_prefix(doc_id)), fault
            if reason in {"truncated", "empty", "repetition"}:
                assert view.vlm["requests"] == 2, (fault, view.vlm)  # the re-ask is counted
            if fault == "trickle":
                assert "2s deadline" in failed["message"], failed
            if fault == "huge":  # reading stopped at the cap (about 0.5 MB here), not at 50 MB
                read = int(re.search(r"passed (\d+) bytes", failed["message"]).group(1))  # type: ignore[union-attr]
                assert read < HUGE_BYTES // 10, failed
        campaign.audit(pending=True)  # the batch's other documents wait their turn

        rerun = campaign.rerun_and_account(batch, {doc_id: pages}, "vlm_outputs", _only(doc_id), pending=True)
        assert rerun.missing == (0 if reason is None else pages), fault
        report_row(
            f"hostile answer: {fault}",
            rerun,
            view.describe(),
            f"page {'stored' if reason is None else 'failed as ' + reason}",
        )
    campaign.audit()  # every document done, nothing pending


#: fault -> reason of the failed page (issue 21 rows 2 and 3)
DISHONEST: dict[str, str] = {
    "abort": "finish_abort",
    "no_finish": "finish_missing",
    "wrong_model": "model_mismatch",
    "content_filter": "finish_content_filter",  # on a scanned page, where "nothing" looked like a blank page
}


def scanned_pdf(tag: str) -> bytes:
    """``tiny_pdf(tag)`` as a scan: the page is one image, with no text layer (``text_layer_chars`` 0)."""
    import pymupdf

    with pymupdf.open(stream=tiny_pdf(tag), filetype="pdf") as source, pymupdf.open() as scan:
        pixmap = source[0].get_pixmap(dpi=150)
        page = scan.new_page(width=source[0].rect.width, height=source[0].rect.height)
        page.insert_image(page.rect, stream=pixmap.tobytes("png"))
        return bytes(scan.tobytes())


def test_dishonest_answers(campaign: Campaign) -> None:
    from mkg_devstack.local_server.faults import WRONG_MODEL_NAME

    cases = [*DISHONEST, "alias"]
    files = {
        f"dishonest-{case}.pdf": (scanned_pdf if case == "content_filter" else tiny_pdf)(f"dishonest {case}")
        for case in cases
    }
    docs = {case: doc_id_of(files[f"dishonest-{case}.pdf"]) for case in cases}
    batch = campaign.new_batch(files)
    assert campaign.materialize(batch, "raw_pdfs,parsed_pages").success
    storage = campaign.storage
    no_fault = {f"{fault}_rate": 0.0 for fault in DISHONEST}

    for fault, reason in DISHONEST.items():
        doc_id = docs[fault]
        campaign.server.set_faults(**{f"{fault}_rate": 1.0})
        result = campaign.materialize(batch, "vlm_outputs", _only(doc_id))
        campaign.server.set_faults(**no_fault)
        view = campaign.view(result.run_id)
        status = storage.get_json(storage.vlm_status_key(doc_id))
        assert view.vlm is not None, (fault, view.describe())
        # A recorded failure with its own reason, nothing cached, and the run fails visibly.
        assert not result.success and "page_failure_rate" in view.failed_checks, (fault, view.describe())
        (failed,) = status["failed_pages"]
        assert (failed["reason"], failed["attempts"], status["state"]) == (reason, 1, "failed"), (fault, status)
        assert f"doc={doc_id} page=1" in failed["message"], failed
        assert not campaign.keys(storage.vlm_page_prefix(doc_id)), fault  # nothing cached, under any key
        assert view.vlm["requests"] == 2, (fault, view.vlm)  # the re-ask is counted
        if fault == "wrong_model":
            assert WRONG_MODEL_NAME in failed["message"] and campaign.server.model in failed["message"], failed
        report = campaign.audit(pending=True)  # clean: the failure is recorded with its reason and attempts
        assert report.counts["pages_failed"] == 1, report.to_text()

        rerun = campaign.rerun_and_account(batch, {doc_id: 1}, "vlm_outputs", _only(doc_id), pending=True)
        assert rerun.missing == 1 == rerun.requested, fault
        (key,) = campaign.keys(storage.vlm_page_prefix(doc_id))
        record = storage.get_json(key)
        assert (record["model"], record["finish_reason"]) == (campaign.server.model, "stop"), record
        report_row(f"dishonest answer: {fault}", rerun, view.describe(), f"page failed as {reason}")

    # The user's choice: the server's other name is configured as an alias, and its answers are accepted.
    doc_id = docs["alias"]
    campaign.set_env(MKG_VLLM__SERVED_MODEL_ALIASES=WRONG_MODEL_NAME)
    campaign.server.set_faults(wrong_model_rate=1.0)
    rerun = campaign.rerun_and_account(batch, {doc_id: 1}, "vlm_outputs", _only(doc_id), pending=False)
    campaign.server.set_faults(**no_fault)
    campaign.set_env(MKG_VLLM__SERVED_MODEL_ALIASES="")
    (key,) = campaign.keys(storage.vlm_page_prefix(doc_id))
    record = storage.get_json(key)
    assert record["model"] == WRONG_MODEL_NAME, record  # who answered
    assert record["engine"] == campaign.identity() and campaign.server.model in record["engine"], record
    report_row("answer from a configured alias", rerun, rerun.view.describe(), "stored, record names the alias")
    campaign.audit()  # every document done, nothing pending


def test_server_killed_mid_run_records_the_first_cause(campaign: Campaign, start_local_vlm_server: Any) -> None:
    server = start_local_vlm_server(api_key=campaign.server.api_key, max_num_seqs=4, latency_s=0.5)
    campaign.server = server  # requests are counted on this one
    # One page at a time, so that the kill lands mid-document.
    campaign.set_env(
        MKG_VLLM__URL=server.url,
        MKG_VLLM__ADAPTIVE="false",
        MKG_VLLM__MIN_IN_FLIGHT="1",
        MKG_VLLM__MAX_IN_FLIGHT="1",
    )
    data = tiny_pdf("server killed", 5)
    doc_id = doc_id_of(data)
    batch = campaign.new_batch({"server-killed.pdf": data})
    assert campaign.materialize(batch, "raw_pdfs,parsed_pages").success

    join = campaign.materialize_in_thread(batch, "vlm_outputs,quality_baseline_diffs")
    wait_until(lambda: campaign.keys(campaign.storage.vlm_page_prefix(doc_id)), "the first page result")
    server.kill()
    result = join()
    view = campaign.view(result.run_id)
    assert not result.success and "page_failure_rate" in view.failed_checks, view.describe()

    status = campaign.storage.get_json(campaign.storage.vlm_status_key(doc_id))
    failed = status["failed_pages"]
    assert failed and status["pages_done"] >= 1 and status["pages_done"] + len(failed) == 5, status
    assert {f["reason"] for f in failed} <= REAL_CAUSES, failed  # never circuit_open
    assert len(campaign.keys(campaign.storage.vlm_page_prefix(doc_id))) == status["pages_done"]  # all kept
    campaign.audit()

    server.start()  # back on the same port
    from mkg_pipeline.vllm.breaker import breaker_for

    breaker = breaker_for(server.url)
    wait_until(lambda: not breaker.is_rejecting(), "the breaker lets a probe through")
    rerun = campaign.rerun_and_account(batch, {doc_id: 5}, "vlm_outputs,quality_baseline_diffs")
    assert rerun.missing == len(failed)
    report_row(
        "VLM server killed mid-run (row 8, row 15)",
        rerun,
        view.describe(),
        f"failed pages' reasons: {sorted({f['reason'] for f in failed})}; {status['pages_done']} pages kept",
    )
