"""The audit (issue 9): hand-built bucket states in MemoryStorage, one test per finding kind.

``_clean_bucket`` writes what a healthy pipeline leaves, following docs/architecture.md ("Records
in the bucket"), including work that is legitimately pending. Each test breaks one thing and expects exactly
the finding that names it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from mkg_pipeline.audit import ERROR, WARNING, AuditReport, audit_bucket
from mkg_pipeline.engines.base import page_cache_key
from mkg_pipeline.storage import MemoryStorage

IDENTITY = "page_markdown|test-model|v1"
BATCH = "b20260101T000000-00000001"
D1, D2, D3, D4, D5 = (f"{i:016x}" for i in range(0xD1, 0xD6))
NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


def _png_sha(doc_id: str, n: int) -> str:
    return f"{doc_id}{n:048x}"


def _rendered(storage: MemoryStorage, doc_id: str, pages: int, failed: tuple[int, ...] = ()) -> None:
    rendered = [n for n in range(1, pages + 1) if n not in failed]
    for n in rendered:
        storage.put_bytes(storage.page_png_key(doc_id, n), b"png")
    storage.put_json(
        storage.page_manifest_key(doc_id),
        {
            "version": 1,
            "doc_id": doc_id,
            "source": f"{doc_id}.pdf",
            "dpi": 100,
            "page_count": pages,
            "pages": [
                {"page": n, "png_key": storage.page_png_key(doc_id, n), "png_sha256": _png_sha(doc_id, n)}
                for n in rendered
            ],
            "failed_pages": [{"page": n, "reason": "render_error", "error": "boom"} for n in failed],
            "rendered_at": NOW.isoformat(),
        },
    )


def _result_key(storage: MemoryStorage, doc_id: str, n: int, identity: str = IDENTITY) -> str:
    return storage.vlm_page_key(doc_id, n, page_cache_key(_png_sha(doc_id, n), identity))


def _record(doc_id: str, n: int, identity: str = IDENTITY) -> dict[str, object]:
    """A page result as the vlm stage writes it (the fields that prove its key, and what assembly reads)."""
    return {
        "version": 2,
        "doc_id": doc_id,
        "page": n,
        "cache_key": page_cache_key(_png_sha(doc_id, n), identity),
        "engine": identity,
        "markdown": f"page {n}",
        "content_list": [],
    }


def _processed(storage: MemoryStorage, doc_id: str, pages: int, failed: tuple[int, ...] = (), state: str = "") -> None:
    failures = []
    etags = {}
    for n in range(1, pages + 1):
        if n in failed:
            failures.append({"page": n, "reason": "timeout", "message": "timed out", "attempts": 2})
        else:
            etags[str(n)] = storage.put_json(_result_key(storage, doc_id, n), _record(doc_id, n))
    storage.put_json(
        storage.vlm_status_key(doc_id),
        {
            "version": 1,
            "doc_id": doc_id,
            "engine": IDENTITY,
            "state": state or ("partial" if failed else "complete"),
            "pages_total": pages,
            "pages_done": pages - len(failed),
            "failed_pages": failures,
            "page_etags": etags,  # the stage vouches for the results it wrote: the audit need not read them
        },
    )


def _clean_bucket() -> MemoryStorage:
    """A batch of seven objects in every state a healthy pipeline produces."""
    s = MemoryStorage()
    objects, results = [], {}
    for name, doc_id in [("a.pdf", D1), ("b.pdf", D2), ("c.pdf", D3), ("d.pdf", D4), ("e.pdf", D5)]:
        etag = s.put_bytes(f"raw/{doc_id}.pdf", f"%PDF {name}".encode())  # drained from incoming/
        s.put_json(s.raw_meta_key(doc_id), {"doc_id": doc_id, "source": name, "pages": 2})
        objects.append({"key": f"incoming/{name}", "etag": etag, "size": 9})
        results[f"incoming/{name}"] = {"status": "accepted", "doc_id": doc_id, "pages": 2, "duplicate": False}
    # rejected, with its record
    objects.append({"key": "incoming/bad.pdf", "etag": "e-bad", "size": 3})
    results["incoming/bad.pdf"] = {"status": "rejected", "reason": "not_a_pdf", "message": "no %PDF header"}
    s.put_json(s.rejected_key("bad.pdf"), {"source": "bad.pdf", "reason": "not_a_pdf"})
    # pending ingest: still in incoming/, no outcome yet
    pending_etag = s.put_bytes("incoming/new.pdf", b"%PDF new")
    objects.append({"key": "incoming/new.pdf", "etag": pending_etag, "size": 8})
    s.put_json(
        s.batch_key(BATCH),
        {"version": 1, "batch_id": BATCH, "created_at": NOW.isoformat(), "objects": objects, "results": results},
    )
    _rendered(s, D1, 2)
    _processed(s, D1, 2)  # complete
    _rendered(s, D2, 3, failed=(3,))
    _processed(s, D2, 2, failed=(2,))  # page 2 failed with reason and attempts, page 3 failed to render
    # D3: not rendered yet (pending render)
    _rendered(s, D4, 2)  # rendered, not sent to the VLM yet (no status.json)
    s.put_json(
        s.render_failure_key(D5),
        {"doc_id": D5, "reason": "render_timeout", "message": "killed after 600 s", "attempts": 1},
    )
    return s


def _audit(storage: MemoryStorage, **kwargs) -> AuditReport:  # type: ignore[no-untyped-def]
    kwargs.setdefault("now", NOW)
    return audit_bucket(storage, IDENTITY, **kwargs)


def _kinds(report: AuditReport, severity: str | None = None) -> list[str]:
    return sorted(f.kind for f in report.findings if severity is None or f.severity == severity)


def _only(report: AuditReport, kind: str):  # type: ignore[no-untyped-def]
    (finding,) = [f for f in report.findings if f.kind == kind]
    return finding


def test_a_clean_bucket_passes_with_its_pending_work_listed() -> None:
    report = _audit(_clean_bucket())
    assert report.findings == [], report.to_text()
    assert report.ok
    pending = {what.split(" ->")[0]: n for (_, what), n in report.pending.items()}
    assert pending == {
        "object(s) still in incoming/, not ingested yet": 1,
        "document(s) not rendered yet": 1,
        "document(s) not sent to the VLM yet (no status.json)": 1,
    }
    assert report.counts["pages"] == 2 + 3 + 2 and report.counts["pages_done"] == 3
    assert report.counts["pages_failed"] == 2
    assert "OK: nothing lost" in report.to_text()


def test_one_list_per_prefix_and_no_request_per_page() -> None:
    storage = _clean_bucket()
    for n in range(3, 400):  # a long document: the audit's cost must not follow its pages
        storage.put_bytes(storage.page_png_key(D1, n), b"png")
    storage.memory.calls.clear()
    _audit(storage)
    calls = storage.memory.calls
    assert calls["list"] == 6  # batches/, incoming/, rejected/, raw/, pages/, vlm/
    assert calls.get("head", 0) == 0
    # 1 batch manifest + page manifests (D1, D2, D4) + statuses (D1, D2) + render failure (D5)
    assert calls["get"] == 1 + 3 + 2 + 1


def test_object_lost() -> None:
    storage = _clean_bucket()
    storage.delete("incoming/new.pdf")  # drained (or deleted) without an outcome: row 1's loss
    report = _audit(storage)
    finding = _only(report, "object_lost")
    assert finding.severity == ERROR and finding.batch_id == BATCH
    assert finding.subject == "s3://memory/incoming/new.pdf"
    assert "no longer in incoming/" in finding.message and "drop it into incoming/ again" in finding.action
    assert not report.ok


def test_an_object_ingested_through_a_later_batch_is_not_lost() -> None:
    storage = _clean_bucket()
    manifest = storage.get_json(storage.batch_key(BATCH))
    new = next(o for o in manifest["objects"] if o["key"] == "incoming/new.pdf")
    later = "b20260101T010000-00000002"
    storage.put_json(
        storage.batch_key(later),
        {
            "batch_id": later,
            "objects": [new],
            "results": {"incoming/new.pdf": {"status": "rejected", "reason": "encrypted", "message": "x"}},
        },
    )
    storage.put_json(storage.rejected_key("new.pdf"), {"reason": "encrypted"})
    storage.delete("incoming/new.pdf")
    assert _kinds(_audit(storage)) == []


def test_accepted_raw_missing() -> None:
    storage = _clean_bucket()
    storage.delete(storage.raw_key(D4))
    storage.delete(storage.raw_meta_key(D4))
    finding = _only(_audit(storage), "accepted_raw_missing")
    assert finding.doc_id == D4 and f"raw/{D4}.pdf" in finding.message


def test_rejection_record_missing() -> None:
    storage = _clean_bucket()
    storage.delete(storage.rejected_key("bad.pdf"))
    finding = _only(_audit(storage), "rejection_record_missing")
    assert "not_a_pdf" in finding.message and finding.subject.endswith("incoming/bad.pdf")


def test_not_drained_is_a_warning() -> None:
    storage = _clean_bucket()
    manifest = storage.get_json(storage.batch_key(BATCH))
    etag = storage.put_bytes("incoming/a.pdf", b"%PDF again")
    next(o for o in manifest["objects"] if o["key"] == "incoming/a.pdf")["etag"] = etag
    storage.put_json(storage.batch_key(BATCH), manifest)
    report = _audit(storage)
    assert _kinds(report) == ["not_drained"] and report.ok
    assert "raw_pdfs" in _only(report, "not_drained").action


def test_ingest_error_waits_for_a_retry() -> None:
    storage = _clean_bucket()
    manifest = storage.get_json(storage.batch_key(BATCH))
    manifest["results"]["incoming/new.pdf"] = {"status": "error", "message": "S3 timed out"}
    storage.put_json(storage.batch_key(BATCH), manifest)
    report = _audit(storage)
    assert _kinds(report) == ["ingest_error"] and report.ok
    assert "S3 timed out" in _only(report, "ingest_error").message


def test_an_object_replaced_after_batching_is_new_work_not_a_loss() -> None:
    storage = _clean_bucket()
    storage.put_bytes("incoming/new.pdf", b"%PDF other bytes")
    report = _audit(storage)
    assert report.findings == []


def test_unbatched_object_waiting_too_long() -> None:
    storage = _clean_bucket()
    storage.put_bytes("incoming/forgotten.pdf", b"%PDF")
    assert _audit(storage, now=datetime.now(UTC)).findings == []  # just dropped: the sensor will batch it
    report = _audit(storage, now=datetime.now(UTC) + timedelta(hours=3))
    finding = _only(report, "unbatched")
    assert finding.severity == WARNING and "incoming_pdfs_sensor" in finding.action


def test_raw_meta_and_raw_pdf_missing() -> None:
    storage = _clean_bucket()
    storage.delete(storage.raw_meta_key(D1))
    storage.delete(storage.raw_key(D2))
    report = _audit(storage)
    assert _only(report, "raw_meta_missing").doc_id == D1
    assert _only(report, "raw_pdf_missing").doc_id == D2
    assert _only(report, "accepted_raw_missing").doc_id == D2


def test_orphan_raw_document_in_no_batch() -> None:
    storage = _clean_bucket()
    orphan = "00000000000000ff"
    storage.put_bytes(storage.raw_key(orphan), b"%PDF")
    storage.put_json(storage.raw_meta_key(orphan), {"doc_id": orphan})
    finding = _only(_audit(storage), "orphan_raw")
    assert finding.doc_id == orphan and "no batch" in finding.message


def test_a_document_validated_but_not_recorded_yet_is_pending_not_orphan() -> None:
    """Between a worker writing raw/ and the run recording the outcome (or a run killed there), the
    document's object is still pending in incoming/: an ingest in progress, not a loss."""
    storage = _clean_bucket()
    doc = "00000000000000ab"
    storage.put_bytes(storage.raw_key(doc), b"%PDF new")
    assert _audit(storage).ok  # the PDF is written first, its metadata just after
    storage.put_json(storage.raw_meta_key(doc), {"doc_id": doc, "source_key": "incoming/new.pdf", "batch_id": BATCH})
    report = _audit(storage)
    assert report.findings == [], report.to_text()

    # Metadata naming an object that is no longer pending (recorded elsewhere, or gone): an orphan again.
    storage.put_json(storage.raw_meta_key(doc), {"doc_id": doc, "source_key": "incoming/old.pdf", "batch_id": BATCH})
    assert _only(_audit(storage), "orphan_raw").doc_id == doc


def test_orphan_outputs_of_an_unknown_document() -> None:
    storage = _clean_bucket()
    ghost = "00000000000000ee"
    storage.put_json(storage.vlm_status_key(ghost), {"doc_id": ghost})
    storage.put_bytes(storage.page_png_key(ghost, 1), b"png")
    finding = _only(_audit(storage), "orphan_outputs")
    assert finding.doc_id == ghost and "2 object(s)" in finding.message


def test_render_failure_without_attempts() -> None:
    storage = _clean_bucket()
    storage.put_json(storage.render_failure_key(D5), {"doc_id": D5, "reason": "render_timeout"})
    assert _only(_audit(storage), "render_failure_incomplete").doc_id == D5


def test_png_missing() -> None:
    storage = _clean_bucket()
    storage.delete(storage.page_png_key(D1, 2))
    finding = _only(_audit(storage), "png_missing")
    # A plain re-run of parsed_pages redraws a missing image (issue 21 row 11): no force needed.
    assert "2" in finding.message and "parsed_pages" in finding.action and "force" not in finding.action


def test_manifest_inconsistent() -> None:
    storage = _clean_bucket()
    manifest = storage.get_json(storage.page_manifest_key(D4))
    manifest["page_count"] = 5
    storage.put_json(storage.page_manifest_key(D4), manifest)
    assert _only(_audit(storage), "manifest_inconsistent").doc_id == D4


def test_status_without_page_manifest() -> None:
    storage = _clean_bucket()
    storage.delete(storage.page_manifest_key(D1))
    assert _only(_audit(storage), "status_without_manifest").doc_id == D1


def test_page_unaccounted() -> None:
    storage = _clean_bucket()
    storage.delete(_result_key(storage, D1, 2))  # status says complete, the result is gone
    report = _audit(storage)
    finding = _only(report, "page_unaccounted")
    assert finding.doc_id == D1 and "page(s) 2 " in finding.message
    assert f"--partition {BATCH}" in finding.action and "vlm_outputs" in finding.action
    assert not report.ok


def test_failure_record_without_reason_or_attempts() -> None:
    storage = _clean_bucket()
    status = storage.get_json(storage.vlm_status_key(D2))
    status["failed_pages"] = [{"page": 2, "reason": "timeout"}]
    storage.put_json(storage.vlm_status_key(D2), status)
    assert _only(_audit(storage), "failure_record_incomplete").doc_id == D2


def test_an_interrupted_vlm_step_is_pending_not_broken() -> None:
    storage = _clean_bucket()
    storage.delete(_result_key(storage, D1, 2))
    status = storage.get_json(storage.vlm_status_key(D1))
    status["state"] = "stale"  # marked by a step that was killed before it assembled the document
    storage.put_json(storage.vlm_status_key(D1), status)
    report = _audit(storage)
    assert report.findings == [] and report.ok
    assert any("interrupted" in what for (_, what) in report.pending)


def test_a_new_engine_identity_makes_documents_pending() -> None:
    report = audit_bucket(_clean_bucket(), "page_markdown|new-model|v2", now=NOW)
    assert report.findings == []
    assert any("another engine identity" in what for (_, what) in report.pending)


def test_unreadable_records() -> None:
    storage = _clean_bucket()
    storage.put_bytes(storage.vlm_status_key(D1), b"{not json")
    storage.put_bytes("batches/b-broken.json", b"")
    assert _kinds(_audit(storage)) == ["batch_manifest_unreadable", "unreadable_record"]


def test_unexpected_keys_are_warnings() -> None:
    storage = _clean_bucket()
    storage.put_bytes("pages/not-a-doc/1.png", b"png")
    report = _audit(storage)
    assert _kinds(report) == ["unexpected_key"] and report.ok


def test_one_batch_only() -> None:
    storage = _clean_bucket()
    storage.delete(_result_key(storage, D1, 2))
    orphan = "00000000000000ff"
    storage.put_bytes(storage.raw_key(orphan), b"%PDF")  # not this batch's business
    storage.memory.calls.clear()
    report = _audit(storage, batch_id=BATCH)
    assert _kinds(report) == ["page_unaccounted"]
    assert report.scope == f"batch {BATCH}"
    assert storage.memory.calls["get"] == 1 + 3 + 2 + 1
    other = _audit(storage, batch_id="b-missing")
    assert _kinds(other) == ["batch_manifest_unreadable"]


def test_report_text_and_json_say_what_to_do() -> None:
    storage = _clean_bucket()
    storage.delete("incoming/new.pdf")
    storage.delete(_result_key(storage, D1, 2))
    report = _audit(storage)
    text = report.to_text()
    assert "ERRORS (2):" in text and "[object_lost] s3://memory/incoming/new.pdf" in text
    assert "-> run `dagster asset materialize" in text
    assert text.rstrip().endswith("pending item(s))") and "BROKEN" in text
    data = json.loads(json.dumps(report.to_json()))
    assert data["ok"] is False and {f["kind"] for f in data["findings"]} == {"object_lost", "page_unaccounted"}


@pytest.mark.parametrize("kind", ["object_lost", "page_unaccounted"])
def test_text_output_is_capped_per_kind(kind: str) -> None:
    report = AuditReport(bucket="b", identity=IDENTITY, scope="all")
    from mkg_pipeline.audit import Finding

    for i in range(30):
        report.add(Finding(kind, ERROR, f"s3://b/x{i}", "m", "a"))
    text = report.to_text(max_per_kind=5)
    assert f"[{kind}] ... and 25 more" in text


# ---- records that prove themselves (issue 21 rows 4, 5) ---------------------------------------------------------


def _truncated(storage: MemoryStorage, key: str) -> None:
    data = storage.get_bytes(key)
    storage.put_bytes(key, data[: len(data) // 2])


def test_a_truncated_page_result_is_named_with_the_command_that_redoes_it() -> None:
    storage = _clean_bucket()
    _truncated(storage, _result_key(storage, D1, 2))
    report = _audit(storage)
    finding = _only(report, "page_result_unreadable")
    assert (finding.severity, finding.doc_id, finding.batch_id) == (ERROR, D1, BATCH)
    assert "page(s) 2 " in finding.message and "not valid JSON" in finding.message
    assert "--select vlm_outputs" in finding.action and f'"doc_ids": ["{D1}"]' in finding.action
    assert '"force"' not in finding.action  # a plain re-run redoes it
    assert not report.ok
    assert report.counts["pages_done"] == 2


def _another_page(storage: MemoryStorage, key: str) -> None:
    storage.put_json(key, _record(D1, 1))


def _another_engine(storage: MemoryStorage, key: str) -> None:
    record = _record(D1, 2)
    record["engine"] = "page_markdown|other-model|v1"
    storage.put_json(key, record)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda s, k: s.put_bytes(k, b""),
        lambda s, k: s.put_bytes(k, b"[]"),
        lambda s, k: s.put_bytes(k, b"{}"),
        _another_page,
        _another_engine,
    ],
    ids=["empty", "list", "empty-object", "another-page", "another-engine"],
)
def test_a_page_result_that_does_not_prove_its_key_is_named(corrupt) -> None:  # type: ignore[no-untyped-def]
    storage = _clean_bucket()
    corrupt(storage, _result_key(storage, D1, 2))
    finding = _only(_audit(storage), "page_result_unreadable")
    assert finding.doc_id == D1 and "page(s) 2 " in finding.message


def test_results_no_status_vouches_for_are_read_and_checked_once_each() -> None:
    storage = _clean_bucket()
    status = storage.get_json(storage.vlm_status_key(D1))
    del status["page_etags"]  # written by an older version
    storage.put_json(storage.vlm_status_key(D1), status)
    storage.memory.calls.clear()
    report = _audit(storage)
    assert report.findings == [] and report.ok
    assert storage.memory.calls["get"] == 1 + 3 + 2 + 1 + 2  # ... and D1's two page results


@pytest.mark.parametrize(
    "garbage",
    [b"garbage", b"", b"[]", b"{}", json.dumps({"doc_id": D2, "engine": IDENTITY, "state": "complete"}).encode()],
    ids=["garbage", "empty", "list", "empty-object", "another-document"],
)
def test_an_unreadable_status_is_named_with_a_plain_rerun(garbage: bytes) -> None:
    storage = _clean_bucket()
    storage.put_bytes(storage.vlm_status_key(D1), garbage)
    report = _audit(storage)
    finding = _only(report, "unreadable_record")
    assert finding.subject == f"s3://memory/vlm/{D1}/status.json" and finding.batch_id == BATCH
    assert "--select vlm_outputs" in finding.action and "rewrites it" in finding.action
    assert not report.ok


@pytest.mark.parametrize("garbage", [b"[]", b"{}", b'{"pages": [{"page": "x"}]}', b"\x00"], ids=str)
def test_an_unreadable_page_manifest_names_parsed_pages(garbage: bytes) -> None:
    storage = _clean_bucket()
    storage.put_bytes(storage.page_manifest_key(D1), garbage)
    finding = _only(_audit(storage), "unreadable_record")
    assert finding.subject == f"s3://memory/pages/{D1}/manifest.json"
    assert "--select parsed_pages" in finding.action and '"force": true' in finding.action
