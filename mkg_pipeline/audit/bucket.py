"""The audit over the whole bucket or one batch: the listings, then rule 1 over the manifests, then rules 2-4
over every document."""

from __future__ import annotations

from datetime import UTC, datetime

from mkg_pipeline.audit.batches import (
    _BatchIndex,
    _check_manifest,
    _check_unbatched,
    _Lookups,
    _read_manifest,
    _report_kept,
    _report_lost,
)
from mkg_pipeline.audit.documents import _being_ingested, _check_document
from mkg_pipeline.audit.listing import _DocKeys, _list_raw, _stream_documents
from mkg_pipeline.audit.report import AuditReport
from mkg_pipeline.storage import Storage


def audit_bucket(
    storage: Storage, identity: str, *, batch_id: str | None = None, now: datetime | None = None
) -> AuditReport:
    """Check the accounting invariant over the whole bucket, or over one batch (``batch_id``)."""
    report = AuditReport(bucket=storage.bucket, identity=identity, scope=f"batch {batch_id}" if batch_id else "all")
    index = _BatchIndex()
    if batch_id is not None:
        _audit_batch(storage, identity, batch_id, index, report)
        return report

    incoming = {o.key: o for o in storage.list_objects(storage.incoming_prefix)}
    rejected = {o.key for o in storage.list_objects("rejected/")}
    raw = _list_raw(storage, report)
    look = _Lookups(storage, incoming=incoming, raw=raw, rejected=rejected)
    for obj in storage.list_objects("batches/"):
        if obj.key.endswith(".json"):
            manifest = _read_manifest(storage, obj.key, report)
            if manifest is not None:
                _check_manifest(storage, obj.key[len("batches/") : -len(".json")], manifest, look, index, report)
    _report_lost(storage, index, report)
    _report_kept(storage, index, report)
    for doc in _stream_documents(storage, raw, report):
        batch_id = index.doc_batch.get(doc.doc_id)
        if batch_id is None and _being_ingested(storage, doc, index):
            report.counts["documents"] += 1  # its object is pending in its batch (counted there)
            continue
        _check_document(storage, doc, identity, batch_id, True, report)
    _check_unbatched(storage, index, incoming, (now or datetime.now(UTC)).timestamp(), report)
    return report


def _audit_batch(storage: Storage, identity: str, batch_id: str, index: _BatchIndex, report: AuditReport) -> None:
    manifest = _read_manifest(storage, storage.batch_key(batch_id), report)
    if manifest is None:
        return
    _check_manifest(storage, batch_id, manifest, _Lookups(storage), index, report)
    _report_lost(storage, index, report)
    _report_kept(storage, index, report)
    for doc_id in [d for d, b in index.doc_batch.items() if b == batch_id]:
        doc = _DocKeys(doc_id)
        doc.raw.update(o.key.rsplit(".", 1)[-1] for o in storage.list_objects(f"raw/{doc_id}."))
        doc.pages.update(
            o.key[len(storage.page_prefix(doc_id)) :] for o in storage.list_objects(storage.page_prefix(doc_id))
        )
        doc.vlm_etags.update(
            (o.key[len(storage.vlm_prefix(doc_id)) :], o.etag) for o in storage.list_objects(storage.vlm_prefix(doc_id))
        )
        doc.vlm.update(doc.vlm_etags)
        if "pdf" in doc.raw:  # otherwise reported as accepted_raw_missing
            _check_document(storage, doc, identity, batch_id, False, report)
