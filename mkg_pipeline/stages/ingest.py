"""raw_pdfs: validate each incoming object, keep accepted ones by content hash, record rejections.

One bad file never takes the batch down: every object ends as ``accepted``
(copied to ``raw/<doc_id>.pdf``), ``rejected`` (``rejected/<name>.json`` with
the reason) or ``error`` (an unexpected problem, e.g. storage; retried on the
next materialization). Accepted and rejected objects are then drained from
``incoming/`` so that the sensor's listing only ever holds pending work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mkg_pipeline.config import PDFConfig
from mkg_pipeline.pdf.validate import PDFRejected, validate_pdf
from mkg_pipeline.pipeline_metrics import DOCUMENTS_REJECTED
from mkg_pipeline.stages.batches import read_batch_manifest
from mkg_pipeline.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class IngestSummary:
    batch_id: str
    accepted: dict[str, str] = field(default_factory=dict)  # source key -> doc_id
    rejected: dict[str, dict[str, str]] = field(default_factory=dict)  # source key -> {reason, message}
    errors: dict[str, str] = field(default_factory=dict)  # source key -> message (retried next time)
    duplicates: int = 0
    pages: dict[str, int] = field(default_factory=dict)  # doc_id -> page count

    @property
    def doc_ids(self) -> list[str]:
        return list(dict.fromkeys(self.accepted.values()))


def _source_name(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def ingest_batch(
    storage: Storage,
    batch_id: str,
    limits: PDFConfig,
    *,
    drain_incoming: bool = True,
    progress: Callable[[str], None] = log.info,
) -> IngestSummary:
    manifest = read_batch_manifest(storage, batch_id)
    results: dict[str, dict[str, Any]] = dict(manifest.get("results", {}))
    summary = IngestSummary(batch_id=batch_id)
    objects = manifest.get("objects", [])
    for index, obj in enumerate(objects, start=1):
        key = obj["key"]
        name = _source_name(key)
        previous = results.get(key)
        if previous and previous.get("status") in {"accepted", "rejected"} and not storage.exists(key):
            # Already ingested and drained by an earlier materialization of this batch.
            _count(summary, key, previous)
            continue
        try:
            outcome = _ingest_one(storage, key, name, limits)
        except Exception as exc:  # storage hiccup, unexpected bug: this object only, retried next time
            log.exception("ingesting %s failed", key)
            outcome = {"status": "error", "message": f"{type(exc).__name__}: {exc}"}
        outcome["at"] = datetime.now(UTC).isoformat()
        results[key] = outcome
        _count(summary, key, outcome)
        progress(f"[{index}/{len(objects)}] {name}: {_describe(outcome)}")
        if drain_incoming and outcome["status"] in {"accepted", "rejected"}:
            _drain(storage, key, obj.get("etag"))
    manifest["results"] = results
    manifest["ingested_at"] = datetime.now(UTC).isoformat()
    storage.put_json(storage.batch_key(batch_id), manifest)
    return summary


def _ingest_one(storage: Storage, key: str, name: str, limits: PDFConfig) -> dict[str, Any]:
    try:
        data = storage.get_bytes(key)
    except FileNotFoundError:
        return {"status": "error", "message": f"{storage.uri(key)} vanished before it was ingested"}
    try:
        info = validate_pdf(data, name, limits)
    except PDFRejected as rejection:
        DOCUMENTS_REJECTED.labels(reason=rejection.reason).inc()
        storage.put_json(
            storage.rejected_key(name),
            {
                "source": name,
                "source_key": key,
                "reason": rejection.reason,
                "message": str(rejection),
                "bytes": len(data),
                "rejected_at": datetime.now(UTC).isoformat(),
            },
        )
        return {"status": "rejected", "reason": rejection.reason, "message": str(rejection)}
    raw_key = storage.raw_key(info.doc_id)
    duplicate = storage.exists(raw_key)
    if not duplicate:
        storage.put_bytes(raw_key, data, content_type="application/pdf")
    storage.put_json(
        storage.raw_meta_key(info.doc_id),
        {
            "doc_id": info.doc_id,
            "sha256": info.sha256,
            "source": name,
            "source_key": key,
            "pages": info.page_count,
            "bytes": info.byte_size,
            "has_text_layer": info.has_text_layer,
            "ingested_at": datetime.now(UTC).isoformat(),
        },
    )
    return {"status": "accepted", "doc_id": info.doc_id, "pages": info.page_count, "duplicate": duplicate}


def _count(summary: IngestSummary, key: str, outcome: dict[str, Any]) -> None:
    status = outcome["status"]
    if status == "accepted":
        summary.accepted[key] = outcome["doc_id"]
        summary.pages[outcome["doc_id"]] = int(outcome.get("pages", 0))
        summary.duplicates += int(bool(outcome.get("duplicate")))
    elif status == "rejected":
        summary.rejected[key] = {"reason": outcome["reason"], "message": outcome["message"]}
    else:
        summary.errors[key] = outcome["message"]


def _describe(outcome: dict[str, Any]) -> str:
    if outcome["status"] == "accepted":
        dup = ", already known" if outcome.get("duplicate") else ""
        return f"accepted as {outcome['doc_id']} ({outcome['pages']} pages{dup})"
    if outcome["status"] == "rejected":
        return f"REJECTED ({outcome['reason']}): {outcome['message']}"
    return f"ERROR (will retry): {outcome['message']}"


def _drain(storage: Storage, key: str, etag: str | None) -> None:
    """Remove an ingested object from incoming/, unless it was replaced meanwhile (then it is new work)."""
    current = storage.head(key)
    if current is None:
        return
    if etag and current.etag != etag:
        log.info("%s was replaced since it was batched; leaving the new version for the sensor", key)
        return
    storage.delete(key)
