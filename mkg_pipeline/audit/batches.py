"""Rule 1: every object of every batch manifest is accepted, rejected or pending; what the documents' checks
need from the manifests is kept in a compact index."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mkg_pipeline.audit.report import _PENDING_WHAT, ERROR, WARNING, AuditReport, Finding, _materialize
from mkg_pipeline.storage import ObjectInfo, Storage

#: an object in incoming/ that no batch lists for this long: the sensor is not picking it up
UNBATCHED_AFTER_S = 3600


# ---- the batch index -----------------------------------------------------------------------------------------


@dataclass
class _BatchIndex:
    """What the documents' checks need from the manifests, kept compact (a million objects fit)."""

    #: doc_id -> a batch that accepted it (or lists it, for golden batches)
    doc_batch: dict[str, str] = field(default_factory=dict)
    #: hashes of (key, etag) that some manifest settled (accepted/rejected)
    settled: set[int] = field(default_factory=set)
    #: hashes of (key, etag) of incoming/ objects some manifest lists *as that version*: a new version under
    #: a batched name is new work, never hidden by the old version's batch (issue 21, row 8)
    batched_incoming: set[int] = field(default_factory=set)
    #: (batch_id, count) of settled objects left in incoming/ because the bucket cannot drain safely
    kept: Counter[str] = field(default_factory=Counter)
    #: hash(key) -> created_at of the newest batch that settled some version of that name
    settled_names: dict[int, str] = field(default_factory=dict)
    #: objects with no outcome that left incoming/: lost unless another manifest settled them, or a later
    #: batch settled a newer version of the name (then this version was overwritten: superseded)
    lost_candidates: list[tuple[str, str, str, str, dict[str, Any] | None]] = field(default_factory=list)
    #: (batch_id, key) of objects still in incoming/ without a final outcome: ingest pending or in progress
    pending_objects: set[tuple[str, str]] = field(default_factory=set)


def _read_manifest(storage: Storage, key: str, report: AuditReport) -> dict[str, Any] | None:
    try:
        manifest = storage.get_json(key)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
        return manifest
    except (FileNotFoundError, ValueError) as exc:
        report.add(
            Finding(
                "batch_manifest_unreadable",
                ERROR,
                storage.uri(key),
                f"the batch manifest cannot be read: {exc}",
                "restore it from a bucket version if versioning is on; until then its objects cannot be accounted for",
            )
        )
        return None


# ---- rule 1: objects of the batch manifests ------------------------------------------------------------------


@dataclass
class _Lookups:
    """Where rule 1 looks objects up: listings (whole bucket) or one request each (one batch)."""

    storage: Storage
    incoming: dict[str, ObjectInfo] | None = None
    raw: dict[str, int] | None = None  # doc_id -> 1 (pdf) | 2 (json)
    rejected: set[str] | None = None

    def in_incoming(self, key: str) -> ObjectInfo | None:
        return self.incoming.get(key) if self.incoming is not None else self.storage.head(key)

    def has_raw(self, doc_id: str) -> bool:
        if self.raw is not None:
            return bool(self.raw.get(doc_id, 0) & 1)
        return self.storage.exists(self.storage.raw_key(doc_id))

    def has_rejection(self, key: str) -> bool:
        return key in self.rejected if self.rejected is not None else self.storage.exists(key)


def _check_manifest(
    storage: Storage,
    batch_id: str,
    manifest: dict[str, Any],
    look: _Lookups,
    index: _BatchIndex,
    report: AuditReport,
) -> None:
    report.counts["batches"] += 1
    results = manifest.get("results") or {}
    created = str(manifest.get("created_at") or "")
    for doc_id in manifest.get("doc_ids") or []:  # golden batches list documents directly
        index.doc_batch.setdefault(doc_id, batch_id)
    for obj in manifest.get("objects") or []:
        report.counts["objects"] += 1
        key, etag = str(obj.get("key", "")), str(obj.get("etag", ""))
        outcome = results.get(key)
        status = (outcome or {}).get("status")
        uri = storage.uri(key)
        current = look.in_incoming(key)
        if current is not None and current.etag == etag:
            index.batched_incoming.add(hash((key, etag)))
        if status == "accepted":
            doc_id = outcome["doc_id"]  # type: ignore[index]
            index.doc_batch.setdefault(doc_id, batch_id)
            if not look.has_raw(doc_id):
                report.add(
                    Finding(
                        "accepted_raw_missing",
                        ERROR,
                        uri,
                        f"the batch accepted it as document {doc_id}, but {storage.uri(storage.raw_key(doc_id))} "
                        "does not exist",
                        "restore the PDF (from the sender or a bucket version) and drop it into incoming/ again",
                        batch_id,
                        doc_id,
                    )
                )
        elif status == "rejected":
            record = storage.rejected_key(key.rsplit("/", 1)[-1])
            if not look.has_rejection(record):
                report.add(
                    Finding(
                        "rejection_record_missing",
                        ERROR,
                        uri,
                        f"the batch rejected it ({outcome.get('reason')}), but {storage.uri(record)} does not exist",  # type: ignore[union-attr]
                        f"{_materialize('raw_pdfs', batch_id)} if the object is still in incoming/; otherwise the "
                        f"reason is in the batch manifest: {outcome.get('message')}",  # type: ignore[union-attr]
                        batch_id,
                    )
                )
        if status in {"accepted", "rejected"}:
            index.settled.add(hash((key, etag)))
            if created > index.settled_names.get(hash(key), ""):
                index.settled_names[hash(key)] = created
            if current is not None and current.etag == etag and outcome.get("kept_in_incoming"):  # type: ignore[union-attr]
                index.kept[batch_id] += 1  # left there on purpose (ingest.py, storage.drain): not a stopped run
            elif current is not None and current.etag == etag:
                report.add(
                    Finding(
                        "not_drained",
                        WARNING,
                        uri,
                        f"ingested ({status}) but still in incoming/ (a run stopped between recording and draining)",
                        f"{_materialize('raw_pdfs', batch_id)}: it drains the object without ingesting it again",
                        batch_id,
                    )
                )
            continue
        if status == "superseded":
            # Overwritten by a new upload before it could be read (ingest saw its ETag change): nothing of this
            # version to account for; the new version is accounted for by its own key + ETag.
            report.counts["superseded"] += 1
            continue
        if current is not None:
            if current.etag != etag:
                continue  # replaced after batching: the new version is new work, the sensor batches it
            report.pending[(batch_id, _PENDING_WHAT["ingest"])] += 1
            index.pending_objects.add((batch_id, key))
            if status == "error":
                report.add(
                    Finding(
                        "ingest_error",
                        WARNING,
                        uri,
                        f"ingesting it failed and it waits for a retry: {outcome.get('message')}",  # type: ignore[union-attr]
                        _materialize("raw_pdfs", batch_id),
                        batch_id,
                    )
                )
            continue
        index.lost_candidates.append((batch_id, created, key, etag, outcome))


def _report_lost(storage: Storage, index: _BatchIndex, report: AuditReport) -> None:
    for batch_id, created, key, etag, outcome in index.lost_candidates:
        if hash((key, etag)) in index.settled:
            continue  # ingested through another batch (requested again after its first batch failed)
        if created and index.settled_names.get(hash(key), "") > created:
            # A batch made later settled another version of this name: this one was overwritten by its
            # sender before it was read (the later batch's run drained the new version first).
            report.counts["superseded"] += 1
            continue
        report.add(
            Finding(
                "object_lost",
                ERROR,
                storage.uri(key),
                "the batch manifest has no outcome for this object"
                + (f" (last: error, {outcome.get('message')})" if outcome else "")
                + " and it is no longer in incoming/: it was removed before it was ingested",
                "restore the file (from the sender or a bucket version) and drop it into incoming/ again; "
                "the sensor batches it anew",
                batch_id,
            )
        )


def _report_kept(storage: Storage, index: _BatchIndex, report: AuditReport) -> None:
    """One warning for the ingested objects kept in incoming/ (a bucket that cannot drain them safely)."""
    if not index.kept:
        return
    report.counts["kept_in_incoming"] += sum(index.kept.values())
    batches = ", ".join(sorted(index.kept)[:5]) + (" ..." if len(index.kept) > 5 else "")
    report.add(
        Finding(
            "kept_in_incoming",
            WARNING,
            storage.uri(storage.incoming_prefix),
            f"{sum(index.kept.values())} ingested object(s) of {len(index.kept)} batch(es) ({batches}) are kept in "
            "incoming/: the bucket is not versioned and this S3 ignores If-Match on DeleteObject, so deleting "
            "them could remove a new version uploaded meanwhile. Nothing is lost; incoming/ grows",
            "enable versioning on the bucket (MinIO: `mc version enable ALIAS/BUCKET`, with a noncurrent-version "
            "expiry rule; docs/deployment.md), then materialize raw_pdfs for those batches: they are drained "
            "without being ingested again",
        )
    )


def _check_unbatched(
    storage: Storage, index: _BatchIndex, incoming: dict[str, ObjectInfo], now: float, report: AuditReport
) -> None:
    for key, info in incoming.items():
        if hash((key, info.etag)) in index.batched_incoming or key.endswith("/"):
            continue
        age = now - info.last_modified.timestamp() if info.last_modified else 0.0
        if age < UNBATCHED_AFTER_S:
            report.pending[("(none yet)", "object(s) in incoming/ not batched yet -> the sensor batches them")] += 1
            continue
        report.add(
            Finding(
                "unbatched",
                WARNING,
                storage.uri(key),
                f"it has waited {age / 3600:.1f} h in incoming/ and no batch lists it",
                "check that incoming_pdfs_sensor is running (UI: Automation); if it is, copy the object onto "
                "itself (a new LastModified) so the sensor sees it, "
                "or run `python -m mkg_pipeline.orchestration.batch_cli`",
            )
        )
