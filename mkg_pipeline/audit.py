"""``python -m mkg_pipeline.audit``: is anything lost? The accounting invariant, checked over the bucket.

The invariant (docs/architecture.md, "The accounting invariant"):

1. every object of every batch manifest ended in ``raw/`` (accepted) or ``rejected/``, or is still
   pending in ``incoming/``. Objects are told apart by key **and ETag**: a new version under the name of a
   batched object is new work, listed as waiting for the sensor (and named once it waits too long), and a
   batched version that left incoming/ without an outcome is lost, whatever else now has its name;
2. every document in ``raw/`` has a page manifest or a recorded render failure, or is pending (never
   rendered yet);
3. every page of a page manifest has a result for the configured engine identity
   (``vlm/<doc_id>/pages/<n>.<cache_key>.json``) that proves itself (it parses and names its document,
   page, cache key and engine: :mod:`mkg_pipeline.records`, the same check the vlm stage makes) or a
   failure in ``status.json`` with its reason and attempts, or is listed in its ``fallback_pages`` (its
   result is the text layer's after invalid VLM answers, ``answers.text_fallback``: counted apart as
   ``pages_fallback``, neither done nor failed), or its document is pending (no ``status.json`` yet);
   every status.json and page manifest proves itself too;
4. no orphans: nothing under ``pages/`` or ``vlm/`` for a document that is not in ``raw/``, and no
   document in ``raw/`` that no batch accepted, unless the object that brought it is still pending in its
   batch (validated, outcome not recorded yet: an ingest in progress, or killed before recording it).

Each problem is a :class:`Finding` that says which object, document or page, what is missing and
what to run. Severities: ``error`` (the invariant is broken: something is lost or inconsistent; exit
status 1), ``warning`` (nothing lost, but a person should look), ``pending`` (work not done yet,
summarised per batch).

Cost: the whole bucket is one LIST per prefix (``incoming/``, ``rejected/``, ``raw/``, ``batches/``,
``pages/``, ``vlm/``) plus one GET per batch manifest, page manifest, render failure and status, and
one GET per page result that its status.json does not vouch for: the stage records the ETag of every
result it counts, so a result whose listed ETag is the recorded one is the object the stage wrote and
checked, and is not read again; any other (written by an older version, or changed behind the
pipeline's back) is read and checked. Memory: batch manifests are checked as they are read and only a compact index is
kept (document -> batch, hashes of settled objects); ``raw/`` is a dict of flags per document;
``pages/`` and ``vlm/`` are streamed and merged with it by document id (listings are in key order), so
one document's keys are held at a time. With ``--batch`` only that batch is audited: one GET of its
manifest, a HEAD per object, and a LIST of ``raw/<doc>.``, ``pages/<doc>/`` and ``vlm/<doc>/`` per
document; the orphan checks need the whole bucket and are skipped.

No Dagster here; the asset check ``bucket_accounting`` (checks.py) runs :func:`audit_bucket` for the
partition's batch.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from mkg_pipeline import records
from mkg_pipeline.storage import ObjectInfo, Storage

log = logging.getLogger(__name__)

ERROR, WARNING, PENDING = "error", "warning", "pending"
#: an object in incoming/ that no batch lists for this long: the sensor is not picking it up
UNBATCHED_AFTER_S = 3600
_DOC_ID = re.compile(r"^[0-9a-f]{16}$")
_PAGE_RESULT = re.compile(r"^pages/(\d+)\.([^./]+)\.json$")


@dataclass(frozen=True)
class Finding:
    kind: str
    severity: str
    subject: str  # the object, document or page concerned (an S3 URI where there is one)
    message: str  # what is wrong
    action: str  # what to do about it
    batch_id: str | None = None
    doc_id: str | None = None
    page: int | None = None


@dataclass
class AuditReport:
    bucket: str
    identity: str
    scope: str
    findings: list[Finding] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    #: (batch_id, what) -> number of objects/documents/pages pending
    pending: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)

    def of(self, severity: str) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    @property
    def ok(self) -> bool:
        """The invariant holds (pending work and warnings allowed)."""
        return not self.of(ERROR)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "bucket": self.bucket,
            "identity": self.identity,
            "scope": self.scope,
            "counts": dict(self.counts),
            "pending": [{"batch_id": b, "what": w, "count": n} for (b, w), n in sorted(self.pending.items())],
            "findings": [asdict(f) for f in self.findings],
        }

    def to_text(self, max_per_kind: int = 20) -> str:
        c = self.counts
        lines = [
            f"audit of s3://{self.bucket} ({self.scope}), engine identity {self.identity}",
            f"checked: {c['batches']} batch(es), {c['objects']} batched object(s), {c['documents']} document(s), "
            f"{c['pages']} page(s): {c['pages_done']} done, {c['pages_failed']} failed (recorded)"
            + (
                f", {c['pages_fallback']} served from the text layer (fallback, asked again next run)"
                if c["pages_fallback"]
                else ""
            ),
        ]
        for severity in (ERROR, WARNING):
            found = self.of(severity)
            if not found:
                continue
            lines += ["", f"{severity.upper()}S ({len(found)}):"]
            for kind, group in itertools.groupby(sorted(found, key=lambda f: f.kind), key=lambda f: f.kind):
                items = list(group)
                for f in items[:max_per_kind]:
                    lines.append(f"- [{kind}] {f.subject}" + (f" (batch {f.batch_id})" if f.batch_id else ""))
                    lines.append(f"    {f.message}")
                    lines.append(f"    -> {f.action}")
                if len(items) > max_per_kind:
                    lines.append(f"- [{kind}] ... and {len(items) - max_per_kind} more (--json lists all)")
        if self.pending:
            lines += ["", "PENDING (work not done yet, nothing lost):"]
            for (batch, what), n in sorted(self.pending.items()):
                lines.append(f"- batch {batch}: {n} {what}")
        verdict = "OK: nothing lost" if self.ok else "BROKEN: the accounting invariant does not hold"
        lines += [
            "",
            f"{verdict} ({len(self.of(ERROR))} error(s), {len(self.of(WARNING))} warning(s), "
            f"{sum(self.pending.values())} pending item(s))",
        ]
        return "\n".join(lines)


# ---- pending work: what to run for it ----------------------------------------------------------------------

_PENDING_WHAT = {
    "ingest": "object(s) still in incoming/, not ingested yet -> materialize raw_pdfs for the batch",
    "render": "document(s) not rendered yet -> materialize parsed_pages for the batch",
    "vlm": "document(s) not sent to the VLM yet (no status.json) -> materialize vlm_outputs for the batch",
    "stale": "document(s) whose vlm step was interrupted (status stale) -> materialize vlm_outputs for the batch",
    "engine": "document(s) processed with another engine identity only -> materialize vlm_outputs for the batch",
}


def _materialize(asset: str, batch_id: str | None, doc_id: str | None = None, extra: str = "") -> str:
    if not batch_id:
        return f"find the batch that holds document {doc_id} and materialize {asset} for it"
    command = f"dagster asset materialize -m mkg_pipeline --select {asset} --partition {batch_id}"
    if doc_id:
        config = {"ops": {asset: {"config": {"doc_ids": [doc_id], **({"force": True} if extra == "force" else {})}}}}
        command += f" --config-json '{json.dumps(config)}'"
    return f"run `{command}` (or materialize {asset} for partition {batch_id} in the UI)"


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


# ---- rules 2-4: documents -------------------------------------------------------------------------------------


@dataclass
class _DocKeys:
    doc_id: str
    raw: set[str] = field(default_factory=set)  # "pdf", "json"
    pages: set[str] = field(default_factory=set)  # names under pages/<doc>/
    vlm: set[str] = field(default_factory=set)  # names under vlm/<doc>/
    vlm_etags: dict[str, str] = field(default_factory=dict)  # name under vlm/<doc>/ -> its listed ETag


def _split(key: str, prefix: str) -> tuple[str, str] | None:
    """(doc_id, rest) of ``<prefix><doc_id>/<rest>``; ``raw/<doc_id>.<ext>`` gives (doc_id, ext)."""
    tail = key[len(prefix) :]
    if prefix == "raw/":
        doc_id, dot, ext = tail.rpartition(".")
        return (doc_id, ext) if dot else None
    doc_id, slash, rest = tail.partition("/")
    return (doc_id, rest) if slash else None


def _stream_documents(storage: Storage, raw: dict[str, int], report: AuditReport) -> Iterator[_DocKeys]:
    """Every document with any object under raw/, pages/ or vlm/, merged by doc_id (listings are sorted)."""
    raw_stream = (
        (d, "raw/", [(n, "") for bit, n in ((1, "pdf"), (2, "json")) if flags & bit])
        for d, flags in sorted(raw.items())
    )
    streams = [raw_stream, *(_grouped_stream(storage.list_objects(p), p, report) for p in ("pages/", "vlm/"))]
    merged = heapq.merge(*streams, key=lambda item: item[0])
    for doc_id, parts in itertools.groupby(merged, key=lambda item: item[0]):
        doc = _DocKeys(doc_id)
        for _, prefix, names in parts:
            {"raw/": doc.raw, "pages/": doc.pages, "vlm/": doc.vlm}[prefix].update(name for name, _ in names)
            if prefix == "vlm/":
                doc.vlm_etags.update(names)
        yield doc


def _unexpected(key: str, prefix: str, report: AuditReport) -> None:
    report.add(
        Finding(
            "unexpected_key",
            WARNING,
            key,
            f"not a key of the layout under {prefix} (document ids are 16 hex characters)",
            "find out what wrote it; the pipeline never reads it",
        )
    )


def _list_raw(storage: Storage, report: AuditReport) -> dict[str, int]:
    raw: dict[str, int] = {}
    for obj in storage.list_objects("raw/"):
        split = _split(obj.key, "raw/")
        if split is None or not _DOC_ID.match(split[0]) or split[1] not in {"pdf", "json"}:
            _unexpected(obj.key, "raw/", report)
            continue
        raw[split[0]] = raw.get(split[0], 0) | (1 if split[1] == "pdf" else 2)
    return raw


def _grouped_stream(
    objects: Iterable[ObjectInfo], prefix: str, report: AuditReport
) -> Iterator[tuple[str, str, list[tuple[str, str]]]]:
    """(doc_id, prefix, (name, ETag) under it) per document, in listing (= doc_id) order, one at a time."""

    def parsed() -> Iterator[tuple[str, str, str]]:
        for obj in objects:
            split = _split(obj.key, prefix)
            if split is None or not _DOC_ID.match(split[0]):
                _unexpected(obj.key, prefix, report)
                continue
            yield split[0], split[1], obj.etag

    for doc_id, group in itertools.groupby(parsed(), key=lambda s: s[0]):
        yield doc_id, prefix, [(rest, etag) for _, rest, etag in group]


def _get(
    storage: Storage,
    key: str,
    what: str,
    doc_id: str,
    report: AuditReport,
    *,
    check: Callable[[Any], str | None] | None = None,
    action: str = "",
    batch_id: str | None = None,
) -> dict[str, Any] | None:
    """The record under ``key`` if it parses and ``check`` finds no problem; else None and a finding.

    S3 errors propagate: an audit that cannot read the bucket says so, it does not report corruption."""
    try:
        data = storage.get_bytes(key)
    except FileNotFoundError as exc:  # listed a moment ago, gone now
        value, problem = None, str(exc)
    else:
        value, problem = records.parse_json(data)
        if problem is None:
            problem = check(value) if check else (None if isinstance(value, dict) else "not a JSON object")
    if problem is None:
        return value  # type: ignore[no-any-return]
    report.add(
        Finding(
            "unreadable_record",
            ERROR,
            storage.uri(key),
            f"the {what} of document {doc_id} cannot be read: {problem}",
            action or f"delete it and re-run the step that writes it ({what})",
            batch_id,
            doc_id,
        )
    )
    return None


def _being_ingested(storage: Storage, doc: _DocKeys, index: _BatchIndex) -> bool:
    """A raw document that no batch accepted yet because its object's outcome is not recorded yet.

    A worker writes ``raw/<doc>.pdf``, then ``raw/<doc>.json`` (naming the object and its batch), and the
    run records the outcome in the batch manifest later, every FLUSH_EVERY objects: in between (a healthy
    run, or one killed there) the document is in raw/ while its object is still pending in incoming/. The
    next run records it. Only a document with nothing rendered qualifies; one GET per such document.
    """
    if not index.pending_objects or "pdf" not in doc.raw or doc.pages or doc.vlm:
        return False
    if "json" not in doc.raw:
        return True  # the PDF is written just before its metadata, by an object still pending
    try:
        meta = storage.get_json(storage.raw_meta_key(doc.doc_id))
    except (FileNotFoundError, ValueError):
        return False
    return isinstance(meta, dict) and (str(meta.get("batch_id")), str(meta.get("source_key"))) in index.pending_objects


def _check_document(
    storage: Storage, doc: _DocKeys, identity: str, batch_id: str | None, full: bool, report: AuditReport
) -> None:
    d = doc.doc_id
    report.counts["documents"] += 1
    raw_pdf = storage.uri(storage.raw_key(d))
    outputs = len(doc.pages) + len(doc.vlm)
    if "pdf" not in doc.raw:
        if "json" in doc.raw:
            report.add(
                Finding(
                    "raw_pdf_missing",
                    ERROR,
                    raw_pdf,
                    f"raw/{d}.json describes the document but the PDF is missing",
                    "restore the PDF (its source name is in the .json) and drop it into incoming/ again",
                    batch_id,
                    d,
                )
            )
        elif outputs and batch_id is None:
            report.add(
                Finding(
                    "orphan_outputs",
                    ERROR,
                    f"s3://{storage.bucket}/pages/{d}/, vlm/{d}/",
                    f"{outputs} object(s) under pages/{d}/ and vlm/{d}/ belong to no document in raw/ and no batch",
                    f"if {d} is not expected, delete those prefixes; otherwise restore raw/{d}.pdf",
                    doc_id=d,
                )
            )
        return  # accepted documents without raw/ are reported from their batch (accepted_raw_missing)
    if "json" not in doc.raw:
        report.add(
            Finding(
                "raw_meta_missing",
                ERROR,
                storage.uri(storage.raw_meta_key(d)),
                "the accepted PDF has no metadata (source name, pages)",
                "drop the same file into incoming/ again: ingest rewrites the metadata (the PDF is not duplicated)",
                batch_id,
                d,
            )
        )
    if full and batch_id is None:
        report.add(
            Finding(
                "orphan_raw",
                ERROR,
                raw_pdf,
                "no batch manifest accepted this document (a manifest was deleted or overwritten), so no batch "
                "will ever render or send it",
                f"drop the PDF into incoming/ again (copy {raw_pdf} to incoming/<name>.pdf): it is batched anew "
                "and recognised as the same document",
                doc_id=d,
            )
        )

    # rule 2: rendered, or a recorded render failure, or pending
    status = None
    if "status.json" in doc.vlm:
        status = _get(
            storage,
            storage.vlm_status_key(d),
            "vlm status",
            d,
            report,
            check=lambda value: records.status_problem(value, doc_id=d),
            action=f"{_materialize('vlm_outputs', batch_id, d)}: it treats the status as missing and rewrites it "
            "(only pages without a valid result are requested)",
            batch_id=batch_id,
        )
    if "manifest.json" not in doc.pages:
        if "failure.json" in doc.pages:
            failure = _get(
                storage,
                storage.render_failure_key(d),
                "render failure record",
                d,
                report,
                action=_materialize("parsed_pages", batch_id, d, "force"),
                batch_id=batch_id,
            )
            if failure is not None and not (failure.get("reason") and int(failure.get("attempts") or 0) >= 1):
                report.add(
                    Finding(
                        "render_failure_incomplete",
                        ERROR,
                        storage.uri(storage.render_failure_key(d)),
                        "the render failure record lacks its reason or attempts",
                        _materialize("parsed_pages", batch_id, d),
                        batch_id,
                        d,
                    )
                )
            report.counts["render_failures"] += 1
        elif status is not None or any(n.startswith("pages/") for n in doc.vlm):
            report.add(
                Finding(
                    "status_without_manifest",
                    ERROR,
                    storage.uri(storage.page_manifest_key(d)),
                    "VLM results exist for this document but its page manifest does not (it was deleted)",
                    _materialize("parsed_pages", batch_id, d, "force"),
                    batch_id,
                    d,
                )
            )
        else:
            report.pending[(batch_id or "(no batch)", _PENDING_WHAT["render"])] += 1
        return
    manifest = _get(
        storage,
        storage.page_manifest_key(d),
        "page manifest",
        d,
        report,
        check=lambda value: records.page_manifest_problem(value, doc_id=d),
        action=f"{_materialize('parsed_pages', batch_id, d, 'force')}, then materialize vlm_outputs for it",
        batch_id=batch_id,
    )
    if manifest is None:
        return
    pages = manifest.get("pages") or []
    render_failed = manifest.get("failed_pages") or []
    source = manifest.get("source") or d
    if manifest.get("page_count") is not None and int(manifest["page_count"]) != len(pages) + len(render_failed):
        report.add(
            Finding(
                "manifest_inconsistent",
                ERROR,
                storage.uri(storage.page_manifest_key(d)),
                f"{source}: page_count is {manifest['page_count']} but the manifest lists {len(pages)} rendered "
                f"and {len(render_failed)} failed page(s)",
                _materialize("parsed_pages", batch_id, d, "force"),
                batch_id,
                d,
            )
        )
    # a text-route page has no image (parsed_pages wrote its result instead)
    missing_png = [p["page"] for p in pages if not records.is_text_page(p) and f"{p['page']}.png" not in doc.pages]
    if missing_png:
        report.add(
            Finding(
                "png_missing",
                ERROR,
                storage.uri(storage.page_prefix(d)),
                f"{source}: the manifest lists page image(s) {_pages(missing_png)} that do not exist",
                # A plain re-run redraws them: parsed_pages believes a manifest only while its images are there.
                _materialize("parsed_pages", batch_id, d),
                batch_id,
                d,
            )
        )

    # rule 3: every page done or failed with reason and attempts, or pending
    done_keys = {(int(m.group(1)), m.group(2)): n for n in doc.vlm if (m := _PAGE_RESULT.match(n))}
    same_engine = status is not None and status.get("engine") == identity
    vouched = (status or {}).get("page_etags") or {} if same_engine else {}
    failures = {int(f["page"]): f for f in (status or {}).get("failed_pages") or [] if "page" in f}
    # pages served from the text layer after invalid VLM answers (answers.text_fallback): accounted for, but
    # neither done (no stored result: the next run asks the VLM again) nor failed; counted apart
    fallbacks = {int(f["page"]) for f in (status or {}).get("fallback_pages") or [] if "page" in f}
    report.counts["pages"] += len(pages) + len(render_failed)
    report.counts["pages_failed"] += len(render_failed)
    unaccounted, incomplete = [], []
    unreadable: list[tuple[int, str]] = []
    waiting = 0
    for page in pages:
        n = int(page["page"])
        # a text-route page's result is the text engine's, under its own cache key (parsed_pages wrote it)
        cache_key = records.page_result_cache_key(page, identity)
        name = done_keys.get((n, cache_key))
        if name is not None:
            problem = None
            if vouched.get(str(n)) != doc.vlm_etags.get(name):  # not the object the stage wrote and checked
                problem = _page_result_problem(
                    storage, storage.vlm_prefix(d) + name, d, n, cache_key, records.page_result_identity(page, identity)
                )
            if problem is None:
                report.counts["pages_done"] += 1
                report.counts["pages_text"] += records.is_text_page(page)
                continue
            unreadable.append((n, problem))
            continue
        if same_engine and n in fallbacks and n not in failures and status.get("state") != "stale":
            report.counts["pages_fallback"] += 1
            continue
        failure = failures.get(n) if same_engine else None
        if failure is not None:
            report.counts["pages_failed"] += 1
            if not failure.get("reason") or int(failure.get("attempts") or 0) < 1:
                incomplete.append(n)
            continue
        if status is None or not same_engine or status.get("state") == "stale":
            waiting += 1
            continue
        unaccounted.append(n)
    if waiting:
        what = "vlm" if status is None else ("stale" if same_engine else "engine")
        report.pending[(batch_id or "(no batch)", _PENDING_WHAT[what])] += 1
    if unaccounted:
        report.add(
            Finding(
                "page_unaccounted",
                ERROR,
                storage.uri(storage.vlm_prefix(d)),
                f"{source}: page(s) {_pages(unaccounted)} have no result for {identity} and no failure in "
                f"status.json (state {status.get('state') if status else '-'})",
                _materialize("vlm_outputs", batch_id, d),
                batch_id,
                d,
            )
        )
    if unreadable:
        shown = "; ".join(f"page {n}: {problem}" for n, problem in unreadable[:5])
        report.add(
            Finding(
                "page_result_unreadable",
                ERROR,
                storage.uri(storage.vlm_page_prefix(d)),
                f"{source}: the stored result of page(s) {_pages([n for n, _ in unreadable])} does not prove itself "
                f"(a page counts only if its result parses and names its document, page, cache key and engine): "
                f"{shown}" + (f"; and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""),
                f"{_materialize('vlm_outputs', batch_id, d)}: it requests exactly these pages again and overwrites "
                "their results",
                batch_id,
                d,
            )
        )
    if incomplete:
        report.add(
            Finding(
                "failure_record_incomplete",
                ERROR,
                storage.uri(storage.vlm_status_key(d)),
                f"{source}: the failure of page(s) {_pages(incomplete)} is recorded without a reason or attempts",
                _materialize("vlm_outputs", batch_id, d),
                batch_id,
                d,
            )
        )


def _page_result_problem(
    storage: Storage, key: str, doc_id: str, page: int, cache_key: str, identity: str
) -> str | None:
    """Why the stored page result under ``key`` is not valid for its key, or None (one GET)."""
    try:
        data = storage.get_bytes(key)
    except FileNotFoundError:
        return "it disappeared while the audit ran"
    _, problem = records.read_page_record(data, doc_id=doc_id, page=page, cache_key=cache_key, engine=identity)
    return problem


def _pages(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in sorted(numbers)[:20])
    return shown + (f" (+{len(numbers) - 20} more)" if len(numbers) > 20 else "")


# ---- entry points -----------------------------------------------------------------------------------------------


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mkg_pipeline.audit",
        description="Check that nothing is lost: every object, document and page of the bucket is accounted for. "
        "Exit status 1 when the accounting invariant is broken (see docs/runbook.md, 'Audit').",
    )
    parser.add_argument("--batch", metavar="ID", help="audit one batch (partition) only")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--max-per-kind", type=int, default=20, help="findings printed per kind (text output)")
    args = parser.parse_args(argv)

    from mkg_pipeline.config import get_settings
    from mkg_pipeline.engines.base import engine_identity

    settings = get_settings()
    storage = Storage.from_config(settings.storage)
    identity = engine_identity(settings.engine, settings.vllm.model, settings.prompt_version)
    report = audit_bucket(storage, identity, batch_id=args.batch)
    sys.stdout.write(
        (json.dumps(report.to_json(), indent=1) if args.json else report.to_text(args.max_per_kind)) + "\n"
    )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
