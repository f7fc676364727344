"""Issue 21, row 8: the audit accounts for incoming/ by key + ETag, never by key alone.

A new version under the name of an object some batch already settled is new work: it is listed as
waiting for the sensor, and after UNBATCHED_AFTER_S as a warning, exactly like any unbatched object.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mkg_pipeline.audit import WARNING
from mkg_pipeline_tests.unit.test_audit import _audit, _clean_bucket, _kinds, _only

WAITING = "object(s) in incoming/ not batched yet -> the sensor batches them"


def test_a_new_version_of_a_settled_object_is_listed_as_waiting() -> None:
    storage = _clean_bucket()
    storage.put_bytes("incoming/a.pdf", b"%PDF a new version")  # a.pdf was accepted and drained
    report = _audit(storage, now=datetime.now(UTC))
    assert report.findings == [], report.to_text()
    assert report.pending[("(none yet)", WAITING)] == 1, report.to_text()


def test_a_new_version_waiting_for_hours_is_named() -> None:
    storage = _clean_bucket()
    storage.put_bytes("incoming/a.pdf", b"%PDF a new version")
    report = _audit(storage, now=datetime.now(UTC) + timedelta(hours=3))
    finding = _only(report, "unbatched")
    assert finding.severity == WARNING and finding.subject.endswith("incoming/a.pdf")
    assert "no batch lists it" in finding.message


def test_a_new_version_of_a_pending_object_is_listed_as_waiting() -> None:
    """new.pdf is batched but not ingested; a newer version replaced it: the newer one waits for the sensor."""
    storage = _clean_bucket()
    storage.put_bytes("incoming/new.pdf", b"%PDF other bytes")
    report = _audit(storage, now=datetime.now(UTC) + timedelta(hours=3))
    assert _kinds(report) == ["unbatched"], report.to_text()
    assert report.ok


def test_a_batched_new_version_that_vanished_unprocessed_is_lost() -> None:
    """The sensor batched the new version; then something deleted it unprocessed (the race of row 1)."""
    storage = _clean_bucket()
    etag = storage.put_bytes("incoming/a.pdf", b"%PDF a new version")
    later = "b20260101T010000-00000002"
    storage.put_json(
        storage.batch_key(later),
        {"batch_id": later, "objects": [{"key": "incoming/a.pdf", "etag": etag, "size": 18}], "results": {}},
    )
    storage.delete("incoming/a.pdf")
    finding = _only(_audit(storage), "object_lost")
    assert finding.batch_id == later and finding.subject.endswith("incoming/a.pdf")


def test_a_version_overwritten_and_ingested_through_a_later_batch_is_superseded_not_lost() -> None:
    """new.pdf (batched, not ingested yet) is overwritten; the new version's later batch runs first and drains
    it; the first batch then finds nothing: that version was overwritten by its sender, not lost."""
    storage = _clean_bucket()
    etag = storage.put_bytes("incoming/new.pdf", b"%PDF the sender's new version")
    later = "b20260101T130000-00000002"
    storage.put_json(
        storage.batch_key(later),
        {
            "batch_id": later,
            "created_at": "2026-01-01T13:00:00+00:00",
            "objects": [{"key": "incoming/new.pdf", "etag": etag, "size": 28}],
            "results": {"incoming/new.pdf": {"status": "rejected", "reason": "not_a_pdf", "message": "x"}},
        },
    )
    storage.put_json(storage.rejected_key("new.pdf"), {"reason": "not_a_pdf"})
    storage.delete("incoming/new.pdf")
    report = _audit(storage)
    assert _kinds(report) == [] and report.counts["superseded"] == 1, report.to_text()
    # The other way round (the settling batch is the older one) the version is lost, as before.
    manifest = storage.get_json(storage.batch_key(later))
    manifest["created_at"] = "2025-12-31T00:00:00+00:00"
    storage.put_json(storage.batch_key(later), manifest)
    assert _kinds(_audit(storage)) == ["object_lost"]
