"""raw_pdfs's stage in-process on the in-memory bucket: outcomes, kills between writes, idempotent drains."""

from __future__ import annotations

from typing import Any

import pytest

from mkg_pipeline.config import PDFConfig
from mkg_pipeline.ids import doc_id_for
from mkg_pipeline.stages.ingest import OutcomesNotRecorded, ingest_batch
from mkg_pipeline.storage import MemoryStorage
from mkg_pipeline_tests.fixtures.corpus import corpus_pdf
from mkg_pipeline_tests.stages.conftest import Killed, drop, fail_once, kill_at_write, record_ops

LIMITS = PDFConfig()
MINIMAL = corpus_pdf("minimal-document.pdf").read_bytes()
BATCH = {
    "a-copy-of-minimal.pdf": MINIMAL,  # the same bytes twice: one document, one duplicate
    "minimal-document.pdf": MINIMAL,
    "two-pages.pdf": "two-pages.pdf",
    "bad-not-a-pdf.pdf": "bad-not-a-pdf.pdf",
    "bad-encrypted-password.pdf": "bad-encrypted-password.pdf",
}


def results(storage: MemoryStorage, batch: str) -> dict[str, dict[str, Any]]:
    return storage.get_json(storage.batch_key(batch)).get("results", {})


def assert_nothing_lost(storage: MemoryStorage, batch: str) -> None:
    """Every object of the batch is still in incoming/, or has a final outcome on record with its artefacts."""
    manifest = storage.get_json(storage.batch_key(batch))
    for obj in manifest["objects"]:
        key = obj["key"]
        if storage.exists(key):
            continue
        outcome = manifest.get("results", {}).get(key)
        assert outcome is not None, f"{key} was drained without a recorded outcome"
        assert outcome["status"] in {"accepted", "rejected"}, (key, outcome)
        if outcome["status"] == "accepted":
            assert storage.exists(storage.raw_key(outcome["doc_id"])), key
            assert storage.exists(storage.raw_meta_key(outcome["doc_id"])), key
        else:
            assert storage.exists(storage.rejected_key(key.rsplit("/", 1)[-1])), key


def assert_all_done(storage: MemoryStorage, batch: str, *, duplicates: bool = True) -> None:
    assert_nothing_lost(storage, batch)
    assert storage.keys(storage.incoming_prefix) == []
    outcomes = results(storage, batch)
    assert {k.removeprefix("incoming/"): r["status"] for k, r in outcomes.items()} == {
        "a-copy-of-minimal.pdf": "accepted",
        "minimal-document.pdf": "accepted",
        "two-pages.pdf": "accepted",
        "bad-not-a-pdf.pdf": "rejected",
        "bad-encrypted-password.pdf": "rejected",
    }
    if duplicates:
        copies = [outcomes[f"incoming/{n}"] for n in ("a-copy-of-minimal.pdf", "minimal-document.pdf")]
        assert sorted(c["duplicate"] for c in copies) == [False, True]  # never a duplicate of itself


def test_each_object_gets_its_outcome() -> None:
    storage = MemoryStorage()
    batch = drop(storage, BATCH)
    summary = ingest_batch(storage, batch, LIMITS)
    assert_all_done(storage, batch)
    assert summary.doc_ids == [doc_id_for(MINIMAL), doc_id_for(corpus_pdf("two-pages.pdf").read_bytes())]
    assert summary.duplicates == 1
    assert summary.drained == 5
    assert {r["reason"] for r in summary.rejected.values()} == {"not_a_pdf", "encrypted"}
    rejection = storage.get_json(storage.rejected_key("bad-encrypted-password.pdf"))
    assert rejection["source_key"] == "incoming/bad-encrypted-password.pdf"
    assert "password" in rejection["message"]
    meta = storage.get_json(storage.raw_meta_key(doc_id_for(MINIMAL)))
    assert meta["pages"] == 1 and meta["sha256"].startswith(doc_id_for(MINIMAL))


def _writes_of_a_clean_run() -> int:
    storage = MemoryStorage()
    batch = drop(storage, BATCH)
    before = sum(storage.memory.calls.get(op, 0) for op in ("put", "delete", "copy"))
    ingest_batch(storage, batch, LIMITS)
    return sum(storage.memory.calls.get(op, 0) for op in ("put", "delete", "copy")) - before


def test_killed_at_any_write_loses_nothing() -> None:
    """Issue 9, row 1: kill the run at each of its writes in turn; the re-run accounts for every object."""
    writes = _writes_of_a_clean_run()
    assert writes >= 10
    for n in range(1, writes + 1):
        storage = MemoryStorage()
        batch = drop(storage, BATCH)
        kill_at_write(storage, n)
        with pytest.raises(Killed):
            ingest_batch(storage, batch, LIMITS)
        storage.memory.fault = None
        assert_nothing_lost(storage, batch)
        ingest_batch(storage, batch, LIMITS)  # the re-run
        assert_all_done(storage, batch, duplicates=False)


def test_an_object_ingested_again_after_a_kill_is_not_its_own_duplicate() -> None:
    storage = MemoryStorage()
    batch = drop(storage, BATCH)
    kill_at_write(storage, 3)  # after the first object's raw/ PDF and metadata, before its outcome
    with pytest.raises(Killed):
        ingest_batch(storage, batch, LIMITS)
    storage.memory.fault = None
    ingest_batch(storage, batch, LIMITS)
    assert_all_done(storage, batch)


def test_rerun_drains_recorded_objects_without_ingesting_them_again() -> None:
    storage = MemoryStorage()
    batch = drop(storage, BATCH)
    ingest_batch(storage, batch, LIMITS, drain_incoming=False)
    assert len(storage.keys(storage.incoming_prefix)) == 5
    ops = record_ops(storage)
    summary = ingest_batch(storage, batch, LIMITS)
    assert_all_done(storage, batch)
    assert summary.drained == 5
    assert not [key for op, key in ops if op == "get" and key.startswith("incoming/")]  # nothing read again
    assert not [key for op, key in ops if op == "put" and key.startswith(("raw/", "rejected/"))]


def test_an_object_replaced_after_its_outcome_is_new_work() -> None:
    storage = MemoryStorage()
    batch = drop(storage, {"two-pages.pdf": "two-pages.pdf", "minimal-document.pdf": MINIMAL})
    ingest_batch(storage, batch, LIMITS, drain_incoming=False)
    before = results(storage, batch)
    storage.put_bytes("incoming/two-pages.pdf", corpus_pdf("pdflatex-4-pages.pdf").read_bytes())
    ingest_batch(storage, batch, LIMITS)
    # The replaced object stays for the sensor (a new ETag); its old outcome stands; the other is drained.
    assert storage.keys(storage.incoming_prefix) == ["incoming/two-pages.pdf"]
    assert results(storage, batch) == before


def test_an_object_replaced_before_ingest_is_left_for_the_sensor() -> None:
    storage = MemoryStorage()
    batch = drop(storage, {"two-pages.pdf": "two-pages.pdf"})
    storage.put_bytes("incoming/two-pages.pdf", MINIMAL)
    summary = ingest_batch(storage, batch, LIMITS)
    assert "replaced since it was batched" in summary.superseded["incoming/two-pages.pdf"]
    assert storage.keys(storage.incoming_prefix) == ["incoming/two-pages.pdf"]
    assert storage.keys("raw/") == []


def test_a_vanished_object_is_an_error() -> None:
    storage = MemoryStorage()
    batch = drop(storage, {"two-pages.pdf": "two-pages.pdf"})
    storage.delete("incoming/two-pages.pdf")
    summary = ingest_batch(storage, batch, LIMITS)
    assert "vanished" in summary.errors["incoming/two-pages.pdf"]
    assert results(storage, batch)["incoming/two-pages.pdf"]["status"] == "error"


def test_a_failing_put_is_an_error_retried_next_time() -> None:
    storage = MemoryStorage()
    batch = drop(storage, {"two-pages.pdf": "two-pages.pdf", "minimal-document.pdf": MINIMAL})
    hit = fail_once(storage, "put", lambda key: key.startswith("raw/"), OSError("S3 said 503 Slow Down"))
    summary = ingest_batch(storage, batch, LIMITS)
    assert len(hit) == 1 and len(summary.errors) == 1 and len(summary.accepted) == 1
    (failed_key,) = summary.errors
    assert "503 Slow Down" in summary.errors[failed_key]
    assert storage.keys(storage.incoming_prefix) == [failed_key]  # an error is never drained
    storage.memory.fault = None
    again = ingest_batch(storage, batch, LIMITS)
    assert not again.errors and len(again.accepted) == 2
    assert storage.keys(storage.incoming_prefix) == []


def test_storage_down_when_recording_fails_the_step_and_drains_nothing() -> None:
    """S3 gone at the end of the run (row 1's second case): the manifest PUT fails, nothing is drained."""
    storage = MemoryStorage()
    batch = drop(storage, BATCH)
    fail_once(storage, "put", lambda key: key.startswith("batches/"), OSError("connection refused"))
    with pytest.raises(OutcomesNotRecorded, match=r"could not be recorded .* connection refused") as failed:
        ingest_batch(storage, batch, LIMITS)
    assert "Nothing is lost" in str(failed.value) and isinstance(failed.value.__cause__, OSError)
    assert len(storage.keys(storage.incoming_prefix)) == 5
    storage.memory.fault = None
    ingest_batch(storage, batch, LIMITS)
    assert_all_done(storage, batch)


def test_a_run_that_lost_its_batch_never_writes_the_manifest() -> None:
    """Another run took the batch over (this one's lease expired): the manifest is the other run's to write."""
    from mkg_pipeline.stages.lease import LeaseLost

    storage = MemoryStorage()
    batch = drop(storage, BATCH)
    before = storage.get_json(storage.batch_key(batch))

    def lost() -> None:
        raise LeaseLost(f"batch {batch}: run r1 no longer holds the lease: another run took it over")

    with pytest.raises(LeaseLost):
        ingest_batch(storage, batch, LIMITS, claim=lost)
    assert storage.get_json(storage.batch_key(batch)) == before
    assert len(storage.keys(storage.incoming_prefix)) == 5  # nothing drained
