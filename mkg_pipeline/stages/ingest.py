"""raw_pdfs: validate each incoming object, keep accepted ones by content hash, record rejections.

One bad file never takes the batch down: every object ends as ``accepted`` (``raw/<doc_id>.pdf`` and its
``raw/<doc_id>.json``), ``rejected`` (``rejected/<name>.json`` with the reason) or ``error`` (an unexpected
problem, e.g. storage; retried on the next materialization).

Nothing can be lost, wherever the run is killed:

1. an object's outcome is written to the batch manifest **before** the object is drained from
   ``incoming/``. Outcomes are flushed every :data:`FLUSH_EVERY` objects (and at the end), then the objects
   of that flush are drained, so a killed run leaves each object either still in ``incoming/`` or recorded;
2. drains are idempotent: a re-run finds the recorded outcome, and drains an object still in ``incoming/``
   with the batched ETag without ingesting it again. An object replaced since it was batched (another ETag)
   is left alone: it is new work for the sensor. That holds even when the new version lands between the
   check and the DELETE (issue 21, row 1): :meth:`Storage.drain` removes exactly the batched version, by
   version id on a versioned bucket or with ``If-Match`` where S3 honours it, and deletes nothing where it
   can do neither (MinIO without versioning): the object is then kept in ``incoming/``, its outcome marked
   ``kept_in_incoming`` (storage.py, "Draining incoming/"). Likewise ingest reads the object with
   ``If-Match: <batched ETag>``, so the bytes validated are those of the batched version, never of one
   that replaced it between a check and the read; a version overwritten before it was read is recorded
   ``superseded`` (final, never drained: the new version is the sensor's);
3. everything written before the outcome is idempotent too (same key, same bytes), so an object ingested
   again after a kill ends the same way, and is not mistaken for a duplicate of itself.

Validation runs in worker processes (the pod's cores), each object under ``workers.timeout_s``: a file that
keeps MuPDF busy past it is rejected as ``validation_timeout``. The bytes never pass through this process:
a worker reads the object, validates it and writes ``raw/`` or ``rejected/`` itself.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from mkg_pipeline.config import PDFConfig, StorageConfig, WorkersConfig
from mkg_pipeline.metrics.pipeline import DOCUMENTS_REJECTED
from mkg_pipeline.pdf.pool import TaskFailed
from mkg_pipeline.pdf.validate import VALIDATION_TIMEOUT, PDFRejected, validate_pdf
from mkg_pipeline.stages.batches import document_pool, read_batch_manifest, storage_for
from mkg_pipeline.storage import DRAINED, KEEP, NEWER_WAITS, PreconditionFailed, Storage

log = logging.getLogger(__name__)

#: outcomes written to the batch manifest per flush (then those objects are drained); a killed run redoes
#: at most this many validations. Also flushed every FLUSH_EVERY_S seconds.
FLUSH_EVERY: Final = 25
FLUSH_EVERY_S: Final = 30.0
FINISHED: Final = frozenset({"accepted", "rejected"})
#: the batched version was overwritten by a new one before it could be read: nothing of it to ingest, and
#: the new version is new work for the sensor. Final (never ingested again), never drained.
SUPERSEDED: Final = "superseded"
_KEPT_WHY: Final = (
    "not deleted from incoming/: the bucket is not versioned and S3 ignores If-Match on DeleteObject, so a "
    "delete could remove a new version uploaded meanwhile"
)


class OutcomesNotRecorded(RuntimeError):
    """The batch manifest could not be written (S3 unreachable): the step fails, the next run resumes.

    Nothing is lost: objects whose outcome is not recorded are still in ``incoming/`` (they are drained only
    after their outcome is stored), and documents a worker already wrote to ``raw/`` are recognised, not
    duplicated, when the next run ingests those objects again.
    """


@dataclass
class IngestSummary:
    batch_id: str
    accepted: dict[str, str] = field(default_factory=dict)  # source key -> doc_id
    rejected: dict[str, dict[str, str]] = field(default_factory=dict)  # source key -> {reason, message}
    errors: dict[str, str] = field(default_factory=dict)  # source key -> message (retried next time)
    superseded: dict[str, str] = field(default_factory=dict)  # source key -> message (a new version waits)
    duplicates: int = 0
    pages: dict[str, int] = field(default_factory=dict)  # doc_id -> page count
    drained: int = 0  # objects removed from incoming/ by this run

    @property
    def doc_ids(self) -> list[str]:
        return list(dict.fromkeys(self.accepted.values()))


def _source_name(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _now() -> str:
    return datetime.now(UTC).isoformat()


def ingest_batch(
    storage: Storage,
    batch_id: str,
    limits: PDFConfig,
    workers: WorkersConfig | None = None,
    *,
    drain_incoming: bool = True,
    progress: Callable[[str], None] = log.info,
    claim: Callable[[], None] | None = None,
) -> IngestSummary:
    """Ingest the objects of batch ``batch_id`` that have no final outcome yet (see the module docstring).

    ``claim`` (the batch lease's ``check``) is called before each write of the batch manifest: a run that
    lost the batch to another run raises there instead of overwriting the other run's outcomes.
    """
    manifest = read_batch_manifest(storage, batch_id)
    results: dict[str, dict[str, Any]] = manifest.setdefault("results", {})
    summary = IngestSummary(batch_id=batch_id)
    objects: list[dict[str, Any]] = manifest.get("objects", [])
    todo: list[dict[str, Any]] = []
    for obj in objects:
        previous = results.get(obj["key"])
        if previous and previous.get("status") in FINISHED | {SUPERSEDED}:
            _count(summary, obj["key"], previous)  # recorded by an earlier run: never ingested twice
        else:
            todo.append(obj)
    if drain_incoming:
        # Outcomes already in the manifest (a run killed between its flush and its drains): drain those now.
        waiting = {o["key"] for o in todo}
        summary.drained += _drain_all(storage, [o for o in objects if o["key"] not in waiting], results)
    if not todo:
        return summary

    pending: list[dict[str, Any]] = []  # recorded in `results`, not yet in the stored manifest

    def flush() -> None:
        if claim is not None:
            claim()  # the manifest is read-modify-written: only by the batch's holder
        manifest["ingested_at"] = _now()
        try:
            if drain_incoming and storage.drain_strategy() == KEEP:
                for obj in pending:  # recorded as kept, so the audit and re-runs know them as done
                    if results[obj["key"]]["status"] in FINISHED:
                        results[obj["key"]]["kept_in_incoming"] = _KEPT_WHY
            storage.put_json(storage.batch_key(batch_id), manifest)  # outcomes first ...
            if drain_incoming:
                summary.drained += _drain_all(storage, pending, results)  # ... then drains
        except Exception as exc:
            raise OutcomesNotRecorded(
                f"the outcome of {len(pending)} object(s) of batch {batch_id} could not be recorded in "
                f"{storage.uri(storage.batch_key(batch_id))} (or their drain from incoming/ failed): is S3 reachable? "
                f"Last error: {type(exc).__name__}: {exc}. Nothing is lost: every object without a recorded outcome "
                f"is still in incoming/, and what was recorded stays. Once S3 answers, materialize raw_pdfs for batch "
                f"{batch_id} again: it resumes from the recorded outcomes."
            ) from exc
        pending.clear()

    pool, target = document_pool(storage, workers or WorkersConfig(), len(todo), preload=(__name__,))
    progress(f"validating {len(todo)} object(s) with {pool.processes} process(es)")
    by_key = {o["key"]: o for o in todo}
    calls = ((o["key"], (target, batch_id, o["key"], o.get("etag"), limits)) for o in todo)
    last_flush = time.monotonic()
    with pool:
        for index, (key, result) in enumerate(pool.run(ingest_object_task, calls), start=1):
            obj = by_key[key]
            outcome = _outcome_of(storage, obj, result, pool.timeout_s)
            if outcome["status"] == "rejected":
                DOCUMENTS_REJECTED.labels(reason=outcome["reason"]).inc()
            results[key] = outcome
            pending.append(obj)
            _count(summary, key, outcome)
            progress(f"[{index}/{len(todo)}] {_source_name(key)}: {_describe(outcome)}")
            if len(pending) >= FLUSH_EVERY or time.monotonic() - last_flush >= FLUSH_EVERY_S:
                flush()
                last_flush = time.monotonic()
    flush()
    return summary


def _outcome_of(
    storage: Storage, obj: dict[str, Any], result: dict[str, Any] | TaskFailed, timeout_s: float | None
) -> dict[str, Any]:
    """The outcome to record for one object, from what its worker returned."""
    if not isinstance(result, TaskFailed):
        return result
    key = obj["key"]
    if result.kind != "timeout":  # an error, a dead or a stalled worker: try again on the next materialization
        return {"status": "error", "message": result.message, "at": _now()}
    # The worker used its whole CPU budget and was killed: record the rejection it could not write itself.
    name = _source_name(key)
    message = (
        f"{name} used more than {timeout_s:g} s of CPU (workers.timeout_s) while being validated and was "
        "stopped: the file is pathologically expensive to interpret; open it in a PDF viewer to check it"
    )
    _write_rejection(storage, key, name, VALIDATION_TIMEOUT, message, int(obj.get("size", 0)))
    return {"status": "rejected", "reason": VALIDATION_TIMEOUT, "message": message, "at": _now()}


def ingest_object_task(
    target: Storage | StorageConfig, batch_id: str, key: str, etag: str | None, limits: PDFConfig
) -> dict[str, Any]:
    """The unit of work of an ingest worker (module-level, so a worker process can run it)."""
    return ingest_object(storage_for(target), batch_id, key, etag, limits)


def ingest_object(storage: Storage, batch_id: str, key: str, etag: str | None, limits: PDFConfig) -> dict[str, Any]:
    """Validate one incoming object and write ``raw/`` or ``rejected/``; return its outcome (not recorded)."""
    name = _source_name(key)
    try:
        # One conditional GET, not HEAD then GET: a version landing in between would be read as this one.
        data = storage.get_bytes(key, if_match=etag) if etag else storage.get_bytes(key)
    except FileNotFoundError:
        return {"status": "error", "message": f"{storage.uri(key)} vanished before it was ingested", "at": _now()}
    except PreconditionFailed:
        # Only a new upload changes an incoming/ object's ETag: the pipeline never writes there.
        return {
            "status": SUPERSEDED,
            "message": f"{storage.uri(key)} was replaced since it was batched (ETag {etag} is no longer its "
            "current version); the new version is left in incoming/ for the sensor",
            "at": _now(),
        }
    try:
        info = validate_pdf(data, name, limits)
    except PDFRejected as rejection:
        _write_rejection(storage, key, name, rejection.reason, str(rejection), len(data))
        return {"status": "rejected", "reason": rejection.reason, "message": str(rejection), "at": _now()}
    raw_key = storage.raw_key(info.doc_id)
    if not storage.exists(raw_key):
        # Written meanwhile by another object with the same bytes: the same content either way.
        with contextlib.suppress(PreconditionFailed):
            storage.put_bytes(raw_key, data, content_type="application/pdf", if_none_match=True)
    meta_key = storage.raw_meta_key(info.doc_id)
    meta = {
        "doc_id": info.doc_id,
        "sha256": info.sha256,
        "source": name,
        "source_key": key,
        "batch_id": batch_id,
        "pages": info.page_count,
        "bytes": info.byte_size,
        "has_text_layer": info.has_text_layer,
        "ingested_at": _now(),
    }
    try:
        # The first object to bring these bytes owns the metadata; later ones are duplicates of it.
        storage.put_json(meta_key, meta, if_none_match=True)
        duplicate = False
    except PreconditionFailed:
        first = storage.get_json(meta_key)
        # This same object ingested again (its run was killed before recording it) is not its own duplicate.
        duplicate = (first.get("source_key"), first.get("batch_id")) != (key, batch_id)
    return {"status": "accepted", "doc_id": info.doc_id, "pages": info.page_count, "duplicate": duplicate, "at": _now()}


def _write_rejection(storage: Storage, key: str, name: str, reason: str, message: str, size: int) -> None:
    storage.put_json(
        storage.rejected_key(name),
        {
            "source": name,
            "source_key": key,
            "reason": reason,
            "message": message,
            "bytes": size,
            "rejected_at": _now(),
        },
    )


def _count(summary: IngestSummary, key: str, outcome: dict[str, Any]) -> None:
    status = outcome["status"]
    if status == "accepted":
        summary.accepted[key] = outcome["doc_id"]
        summary.pages[outcome["doc_id"]] = int(outcome.get("pages", 0))
        summary.duplicates += int(bool(outcome.get("duplicate")))
    elif status == "rejected":
        summary.rejected[key] = {"reason": outcome["reason"], "message": outcome["message"]}
    elif status == SUPERSEDED:
        summary.superseded[key] = outcome["message"]
    else:
        summary.errors[key] = outcome["message"]


def _describe(outcome: dict[str, Any]) -> str:
    if outcome["status"] == "accepted":
        dup = ", already known" if outcome.get("duplicate") else ""
        return f"accepted as {outcome['doc_id']} ({outcome['pages']} pages{dup})"
    if outcome["status"] == "rejected":
        return f"REJECTED ({outcome['reason']}): {outcome['message']}"
    if outcome["status"] == SUPERSEDED:
        return f"SUPERSEDED: {outcome['message']}"
    return f"ERROR (will retry): {outcome['message']}"


def _drain_all(storage: Storage, objects: list[dict[str, Any]], results: dict[str, dict[str, Any]]) -> int:
    """Drain the objects whose recorded outcome is final; the manifest holding it must already be stored."""
    return sum(
        _drain(storage, o["key"], o.get("etag")) for o in objects if results.get(o["key"], {}).get("status") in FINISHED
    )


def _drain(storage: Storage, key: str, etag: str | None) -> bool:
    """Remove an ingested object from incoming/, never a version that replaced it (that is new work)."""
    done = storage.drain(key, etag)
    if done == NEWER_WAITS:
        log.info("%s was replaced since it was batched; leaving the new version for the sensor", key)
    return done == DRAINED
