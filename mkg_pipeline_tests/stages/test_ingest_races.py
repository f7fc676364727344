"""Issue 21, row 1: a new version of an incoming object lands in the middle of raw_pdfs (in-memory bucket).

The bucket's ``fault`` hook runs just before an operation reaches the bucket, so a test can land the new
version at exactly the worst moment: after the drain has checked the ETag and before its DELETE, or
after ingest has checked the object and before it reads the bytes. The new version must never be
deleted unprocessed, and the bytes of one version must never be recorded as another's.
"""

from __future__ import annotations

from collections.abc import Callable

from mkg_pipeline.audit import audit_bucket
from mkg_pipeline.config import PDFConfig
from mkg_pipeline.ids import doc_id_for
from mkg_pipeline.stages.ingest import ingest_batch
from mkg_pipeline.stages.sensor_plan import pending_objects
from mkg_pipeline.storage import MemoryStorage
from mkg_pipeline_tests.fixtures.corpus import corpus_pdf
from mkg_pipeline_tests.stages.conftest import drop

LIMITS = PDFConfig()
OLD = corpus_pdf("two-pages.pdf").read_bytes()
NEW = corpus_pdf("minimal-document.pdf").read_bytes()
KEY = "incoming/report.pdf"
IDENTITY = "page_markdown|test-model|v1"


def land_new_version_before(storage: MemoryStorage, op: str, data: bytes = NEW) -> Callable[[], list[str]]:
    """The first ``op`` on KEY lands ``data`` under KEY just before it reaches the bucket; returns the ops hit."""
    hit: list[str] = []

    def fault(this_op: str, key: str) -> None:
        if this_op == op and key == KEY and not hit:
            hit.append(this_op)
            storage.memory.fault = None  # the replacement's own PUT goes straight through
            storage.put_bytes(KEY, data)
            storage.memory.fault = fault

    storage.memory.fault = fault
    return lambda: hit


def test_a_replacement_racing_the_drain_is_never_deleted() -> None:
    storage = MemoryStorage()
    batch = drop(storage, {"report.pdf": OLD})
    hits = land_new_version_before(storage, "delete")
    summary = ingest_batch(storage, batch, LIMITS)
    assert hits() == ["delete"]
    assert summary.accepted == {KEY: doc_id_for(OLD)}
    # The new version waits in incoming/ for the sensor; the old one is recorded and in raw/.
    assert storage.keys("incoming/") == [KEY]
    assert storage.get_bytes(KEY) == NEW
    assert storage.exists(storage.raw_key(doc_id_for(OLD)))
    report = audit_bucket(storage, IDENTITY)
    assert report.ok, report.to_text()
    waiting = {what: n for (batch_id, what), n in report.pending.items() if batch_id == "(none yet)"}
    assert sum(waiting.values()) == 1, report.to_text()  # row 8: listed as waiting, by key + ETag


def test_a_replacement_between_check_and_read_is_not_ingested_as_the_batched_version() -> None:
    storage = MemoryStorage()
    batch = drop(storage, {"report.pdf": OLD})
    land_new_version_before(storage, "get")
    summary = ingest_batch(storage, batch, LIMITS)
    # The batched version is gone (overwritten): the batch must not claim it was the new bytes.
    assert doc_id_for(NEW) not in summary.accepted.values(), summary
    assert "replaced since it was batched" in summary.superseded[KEY]
    assert storage.keys("raw/") == []
    assert storage.get_bytes(KEY) == NEW  # left for the sensor
    assert audit_bucket(storage, IDENTITY).ok
    # A re-run does not turn the superseded version into an error; the new version's own batch drains it,
    # and the old version is never reported lost (it was overwritten by its sender, not by the pipeline).
    assert ingest_batch(storage, batch, LIMITS).superseded == summary.superseded
    later = drop(storage, {"report.pdf": NEW}, batch_id="b-later")
    assert ingest_batch(storage, later, LIMITS).accepted == {KEY: doc_id_for(NEW)}
    assert storage.keys("incoming/") == []
    report = audit_bucket(storage, IDENTITY)
    assert report.ok and report.counts["superseded"] == 1, report.to_text()


def test_a_bucket_that_ignores_conditional_deletes_keeps_objects_instead_of_losing_them() -> None:
    """An S3 without a safe delete (MinIO ignores If-Match on DELETE, versioning off): nothing drained."""
    storage = MemoryStorage()
    storage.memory.honours_delete_if_match = False
    batch = drop(storage, {"report.pdf": OLD})
    hits = land_new_version_before(storage, "delete")
    summary = ingest_batch(storage, batch, LIMITS)
    assert summary.accepted == {KEY: doc_id_for(OLD)} and summary.drained == 0
    assert hits() == []  # no DELETE was ever sent
    outcome = storage.get_json(storage.batch_key(batch))["results"][KEY]
    assert outcome["status"] == "accepted" and "kept_in_incoming" in outcome
    report = audit_bucket(storage, IDENTITY)
    assert report.ok and not [f for f in report.findings if f.kind == "not_drained"], report.to_text()
    assert "versioning" in " ".join(f.action for f in report.findings if f.kind == "kept_in_incoming")
    # A re-run neither ingests it again nor deletes it.
    again = ingest_batch(storage, batch, LIMITS)
    assert again.accepted == {KEY: doc_id_for(OLD)} and again.drained == 0
    assert storage.keys("incoming/") == [KEY]
    assert pending_objects(storage, batch) == []  # done: never a reason for the sensor to retry the batch
