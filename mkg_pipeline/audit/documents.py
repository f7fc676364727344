"""Rules 2-4 for one document: its raw objects, its rendering, and a result or a failure for every page."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mkg_pipeline import records
from mkg_pipeline.audit.batches import _BatchIndex
from mkg_pipeline.audit.listing import _DocKeys
from mkg_pipeline.audit.report import _PENDING_WHAT, ERROR, AuditReport, Finding, _materialize
from mkg_pipeline.storage import Storage

_PAGE_RESULT = re.compile(r"^pages/(\d+)\.([^./]+)\.json$")


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
    """Rules 2-4 for one document, in order: raw/, then rendered or not, then every page of its manifest."""
    report.counts["documents"] += 1
    if not _check_raw(storage, doc, batch_id, full, report):
        return  # accepted documents without raw/ are reported from their batch (accepted_raw_missing)
    status = _read_status(storage, doc, batch_id, report)
    if "manifest.json" not in doc.pages:
        _check_unrendered(storage, doc, status, batch_id, report)
        return
    manifest = _read_page_manifest(storage, doc, batch_id, report)
    if manifest is None:
        return
    pages = manifest.get("pages") or []
    render_failed = manifest.get("failed_pages") or []
    source = manifest.get("source") or doc.doc_id
    _check_page_manifest(storage, doc, manifest, source, batch_id, report)

    # rule 3: every page done or failed with reason and attempts, or pending
    report.counts["pages"] += len(pages) + len(render_failed)
    report.counts["pages_failed"] += len(render_failed)
    tally = _tally_pages(storage, doc, pages, status, identity, report)
    _report_pages(storage, doc, tally, status, identity, source, batch_id, report)


def _check_raw(storage: Storage, doc: _DocKeys, batch_id: str | None, full: bool, report: AuditReport) -> bool:
    """The document's raw/ objects and its batch; False when its PDF is missing (nothing more to check)."""
    d = doc.doc_id
    raw_pdf = storage.uri(storage.raw_key(d))
    if "pdf" not in doc.raw:
        _check_missing_pdf(storage, doc, batch_id, report)
        return False
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
    return True


def _check_missing_pdf(storage: Storage, doc: _DocKeys, batch_id: str | None, report: AuditReport) -> None:
    """A document with no raw/<doc>.pdf: its metadata or outputs outlived it."""
    d = doc.doc_id
    raw_pdf = storage.uri(storage.raw_key(d))
    outputs = len(doc.pages) + len(doc.vlm)
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


def _read_status(storage: Storage, doc: _DocKeys, batch_id: str | None, report: AuditReport) -> dict[str, Any] | None:
    """The document's status.json if there is one and it proves itself (else a finding), or None."""
    d = doc.doc_id
    if "status.json" not in doc.vlm:
        return None
    return _get(
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


def _check_unrendered(
    storage: Storage, doc: _DocKeys, status: dict[str, Any] | None, batch_id: str | None, report: AuditReport
) -> None:
    """Rule 2 for a document without a page manifest: a recorded render failure, or pending."""
    d = doc.doc_id
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
            _rerun_error(
                report,
                "render_failure_incomplete",
                storage.uri(storage.render_failure_key(d)),
                "the render failure record lacks its reason or attempts",
                "parsed_pages",
                batch_id,
                d,
            )
        report.counts["render_failures"] += 1
    elif status is not None or any(n.startswith("pages/") for n in doc.vlm):
        _rerun_error(
            report,
            "status_without_manifest",
            storage.uri(storage.page_manifest_key(d)),
            "VLM results exist for this document but its page manifest does not (it was deleted)",
            "parsed_pages",
            batch_id,
            d,
            "force",
        )
    else:
        report.pending[(batch_id or "(no batch)", _PENDING_WHAT["render"])] += 1


def _read_page_manifest(
    storage: Storage, doc: _DocKeys, batch_id: str | None, report: AuditReport
) -> dict[str, Any] | None:
    """The document's page manifest if it proves itself, else None and a finding."""
    d = doc.doc_id
    return _get(
        storage,
        storage.page_manifest_key(d),
        "page manifest",
        d,
        report,
        check=lambda value: records.page_manifest_problem(value, doc_id=d),
        action=f"{_materialize('parsed_pages', batch_id, d, 'force')}, then materialize vlm_outputs for it",
        batch_id=batch_id,
    )


def _check_page_manifest(
    storage: Storage, doc: _DocKeys, manifest: dict[str, Any], source: str, batch_id: str | None, report: AuditReport
) -> None:
    """The manifest counts its pages right, and every page image it lists exists."""
    d = doc.doc_id
    pages = manifest.get("pages") or []
    render_failed = manifest.get("failed_pages") or []
    if manifest.get("page_count") is not None and int(manifest["page_count"]) != len(pages) + len(render_failed):
        _rerun_error(
            report,
            "manifest_inconsistent",
            storage.uri(storage.page_manifest_key(d)),
            f"{source}: page_count is {manifest['page_count']} but the manifest lists {len(pages)} rendered "
            f"and {len(render_failed)} failed page(s)",
            "parsed_pages",
            batch_id,
            d,
            "force",
        )
    # a text-route page has no image (parsed_pages wrote its result instead)
    missing_png = [p["page"] for p in pages if not records.is_text_page(p) and f"{p['page']}.png" not in doc.pages]
    if missing_png:
        _rerun_error(
            report,
            "png_missing",
            storage.uri(storage.page_prefix(d)),
            f"{source}: the manifest lists page image(s) {_pages(missing_png)} that do not exist",
            # A plain re-run redraws them: parsed_pages believes a manifest only while its images are there.
            "parsed_pages",
            batch_id,
            d,
        )


@dataclass
class _PageTally:
    """The pages of one document that are not done or accounted for (rule 3), by why."""

    same_engine: bool  # status.json is this engine identity's
    waiting: int = 0  # no status yet, another engine's, or a stale one: pending
    unaccounted: list[int] = field(default_factory=list)  # neither a result nor a failure
    incomplete: list[int] = field(default_factory=list)  # a failure without its reason or attempts
    unreadable: list[tuple[int, str]] = field(default_factory=list)  # (page, why its result does not prove itself)


def _tally_pages(
    storage: Storage,
    doc: _DocKeys,
    pages: list[dict[str, Any]],
    status: dict[str, Any] | None,
    identity: str,
    report: AuditReport,
) -> _PageTally:
    """Count every page of the manifest done, failed or from the text layer; the rest go in the tally."""
    d = doc.doc_id
    done_keys = {(int(m.group(1)), m.group(2)): n for n in doc.vlm if (m := _PAGE_RESULT.match(n))}
    same_engine = status is not None and status.get("engine") == identity
    vouched = (status or {}).get("page_etags") or {} if same_engine else {}
    failures = {int(f["page"]): f for f in (status or {}).get("failed_pages") or [] if "page" in f}
    # pages served from the text layer after invalid VLM answers (answers.text_fallback): accounted for, but
    # neither done (no stored result: the next run asks the VLM again) nor failed; counted apart
    fallbacks = {int(f["page"]) for f in (status or {}).get("fallback_pages") or [] if "page" in f}
    tally = _PageTally(same_engine)
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
            tally.unreadable.append((n, problem))
            continue
        if same_engine and n in fallbacks and n not in failures and status.get("state") != "stale":
            report.counts["pages_fallback"] += 1
            continue
        failure = failures.get(n) if same_engine else None
        if failure is not None:
            report.counts["pages_failed"] += 1
            if not failure.get("reason") or int(failure.get("attempts") or 0) < 1:
                tally.incomplete.append(n)
            continue
        if status is None or not same_engine or status.get("state") == "stale":
            tally.waiting += 1
            continue
        tally.unaccounted.append(n)
    return tally


def _report_pages(
    storage: Storage,
    doc: _DocKeys,
    tally: _PageTally,
    status: dict[str, Any] | None,
    identity: str,
    source: str,
    batch_id: str | None,
    report: AuditReport,
) -> None:
    """One pending item for the document's waiting pages, one finding per kind of page not accounted for."""
    d = doc.doc_id
    if tally.waiting:
        what = "vlm" if status is None else ("stale" if tally.same_engine else "engine")
        report.pending[(batch_id or "(no batch)", _PENDING_WHAT[what])] += 1
    if tally.unaccounted:
        _rerun_error(
            report,
            "page_unaccounted",
            storage.uri(storage.vlm_prefix(d)),
            f"{source}: page(s) {_pages(tally.unaccounted)} have no result for {identity} and no failure in "
            f"status.json (state {status.get('state') if status else '-'})",
            "vlm_outputs",
            batch_id,
            d,
        )
    unreadable = tally.unreadable
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
    if tally.incomplete:
        _rerun_error(
            report,
            "failure_record_incomplete",
            storage.uri(storage.vlm_status_key(d)),
            f"{source}: the failure of page(s) {_pages(tally.incomplete)} is recorded without a reason or attempts",
            "vlm_outputs",
            batch_id,
            d,
        )


def _rerun_error(
    report: AuditReport,
    kind: str,
    subject: str,
    message: str,
    asset: str,
    batch_id: str | None,
    doc_id: str,
    extra: str = "",
) -> None:
    """An error about one document that materializing ``asset`` for it again repairs."""
    report.add(Finding(kind, ERROR, subject, message, _materialize(asset, batch_id, doc_id, extra), batch_id, doc_id))


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
