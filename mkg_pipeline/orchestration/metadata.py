"""What the Dagster UI shows for each materialization and check: built here from the stages' summaries, so
the asset and check bodies only wire the stages to Dagster.

For ``vlm_outputs``:

- ``documents``: a typed table (``MetadataValue.table``), one row per document of the batch in batch order: its
  file name, doc id, state, pages done / failed / total (and pages by route when the stage counts them), the
  S3 URI of its ``document.md`` and, when the export root is known (:data:`EXPORT_DIR_ENV`), the path the
  demo's export writes it to. The first :data:`MAX_LINKS` documents also get their ``document.md`` as a
  ``MetadataValue.url`` entry, which the UI shows as a link.
- ``preview``: the first :data:`PREVIEW_DOCS` documents in batch order, each under a heading with its file name,
  tables as pipe tables, figures named (:func:`mkg_pipeline.document.document_preview`). Batch order, not
  "documents with tables first": the preview then matches the table above it and the order the user dropped
  the files in, and choosing by content would mean reading every document of a batch of thousands.
  Bounded per document (:data:`PREVIEW_DOC_CHARS`) and in all (:data:`PREVIEW_TOTAL_CHARS`).

Reading the rows (:func:`read_documents`) does S3 I/O: one ``status.json`` per listed document and one
``document.md`` per previewed document, all bounded. :func:`vlm_metadata` is pure.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from mkg_pipeline.document import document_preview
from mkg_pipeline.markdown_table import markdown_table

#: documents listed in the table (a batch may hold thousands; each row costs a status.json read)
MAX_TABLE_ROWS = 200
#: documents whose document.md is also a clickable url entry
MAX_LINKS = 10
#: documents previewed, in batch order
PREVIEW_DOCS = 5
#: characters of one document's Markdown in the preview
PREVIEW_DOC_CHARS = 4000
#: characters of the whole preview (Dagster stores metadata in its event log: keep it small)
PREVIEW_TOTAL_CHARS = 16000
#: unreadable records listed in the metadata (the step log has every one)
MAX_LISTED = 50
#: where the demo exports the outputs (``<root>/<name>/<name>.md``, mkg_pipeline/export.py); set by whoever
#: exports, never guessed: without it the table has no export column.
EXPORT_DIR_ENV = "MKG_EXPORT_DIR"


@dataclass(frozen=True)
class DocumentRow:
    doc_id: str
    source: str
    state: str
    pages_total: int | None
    pages_done: int | None
    pages_failed: int | None
    document_md: str  # its S3 URI
    routes: Mapping[str, int] | None = None
    export_path: str | None = None


def export_root() -> Path | None:
    value = os.environ.get(EXPORT_DIR_ENV, "").strip()
    return Path(value) if value else None


def read_documents(
    storage: Any,
    doc_ids: Sequence[str],
    sources: Mapping[str, str],
    summary: Any,
    *,
    export_dir: Path | None = None,
) -> list[DocumentRow]:
    """One row per document of ``doc_ids`` (at most :data:`MAX_TABLE_ROWS`), from its ``status.json``.

    A document the run did not record (no or unreadable status) keeps the state the summary gave it. Pages by
    route come from the summary's ``routes_by_document`` when the stage keeps one.
    """
    from mkg_pipeline.export import folder_name

    routes_by_document: Mapping[str, Mapping[str, int]] = getattr(summary, "routes_by_document", None) or {}
    taken: set[str] = set()
    rows = []
    for doc_id in doc_ids[:MAX_TABLE_ROWS]:
        unreadable = ""
        try:
            status = storage.get_json(storage.vlm_status_key(doc_id))
        except FileNotFoundError:
            status = None
        except Exception as exc:  # the work is done and stored: a row without counts, not a failed step
            status, unreadable = None, f" (status.json unreadable: {type(exc).__name__})"
        status = status if isinstance(status, dict) else {}
        source = str(status.get("source") or sources.get(doc_id) or doc_id)
        failed = status.get("failed_pages")
        export_path = None
        if export_dir is not None:
            # the name export_documents gives it (the first of equal names keeps it, the next gets -<doc_id>)
            name = folder_name(source, doc_id, taken)
            export_path = str(export_dir / name / f"{name}.md")
        rows.append(
            DocumentRow(
                doc_id=doc_id,
                source=source,
                state=str(status.get("state") or summary.documents.get(doc_id) or "not recorded") + unreadable,
                pages_total=_int(status.get("pages_total")),
                pages_done=_int(status.get("pages_done")),
                pages_failed=len(failed) if isinstance(failed, list) else None,
                document_md=storage.uri(storage.document_md_key(doc_id)),
                routes=routes_by_document.get(doc_id),
                export_path=export_path,
            )
        )
    return rows


def sources_of(manifest: Mapping[str, Any]) -> dict[str, str]:
    """doc_id -> the file name it was dropped as (the first, for bytes dropped under several names)."""
    sources: dict[str, str] = {}
    for key, result in manifest.get("results", {}).items():
        if isinstance(result, dict) and result.get("status") == "accepted" and result.get("doc_id"):
            sources.setdefault(str(result["doc_id"]), str(key).rsplit("/", 1)[-1])
    return sources


def read_previews(storage: Any, rows: Sequence[DocumentRow]) -> list[tuple[DocumentRow, str]]:
    """``document.md`` of the first :data:`PREVIEW_DOCS` documents that have one, in batch order."""
    found = []
    for row in rows:
        if len(found) == PREVIEW_DOCS:
            break
        try:
            markdown = storage.get_bytes(storage.document_md_key(row.doc_id)).decode("utf-8", errors="replace")
        except Exception:  # missing or unreadable: the table says which; preview the next one
            continue
        found.append((row, markdown))
    return found


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def route_names(rows: Sequence[DocumentRow]) -> list[str]:
    """The routes some row counts, in a stable order (none: the stage does not count routes)."""
    return sorted({route for row in rows for route in (row.routes or {})})


def documents_table(rows: Sequence[DocumentRow]) -> dg.TableMetadataValue:
    routes = route_names(rows)
    with_export = any(row.export_path for row in rows)
    # Where the Markdown is comes right after the name and state: the UI's metadata column is narrow and
    # scrolls sideways, and "where is my document.md?" is the question the table answers first.
    columns = [
        dg.TableColumn("file", "string", description="source file name"),
        dg.TableColumn("state", "string", description="complete, partial, failed, or why it was not recorded"),
        dg.TableColumn("document_md", "string", description="S3 URI of the document's Markdown"),
    ]
    if with_export:
        columns.append(dg.TableColumn("export_path", "string", description="where the demo's export writes it"))
    columns += [
        dg.TableColumn("pages_done", "int"),
        dg.TableColumn("pages_failed", "int"),
        dg.TableColumn("pages_total", "int"),
        *(dg.TableColumn(f"pages_{route}", "int", description=f"pages on the {route} route") for route in routes),
        dg.TableColumn("doc_id", "string"),
    ]
    records = []
    for row in rows:
        data: dict[str, Any] = {"file": row.source, "state": row.state, "document_md": row.document_md}
        if with_export:
            data["export_path"] = row.export_path or ""
        data.update(
            {
                "pages_done": row.pages_done,
                "pages_failed": row.pages_failed,
                "pages_total": row.pages_total,
                **{f"pages_{route}": int((row.routes or {}).get(route, 0)) for route in routes},
                "doc_id": row.doc_id,
            }
        )
        records.append(dg.TableRecord(data))  # None: not known (no status.json); every record has every field
    return dg.MetadataValue.table(records, schema=dg.TableSchema(columns=columns))


def batch_preview(previews: Sequence[tuple[DocumentRow, str]], documents: int) -> str:
    """The previews of ``previews``, each bounded, the whole bounded; says how many of ``documents`` it shows."""
    parts: list[str] = []
    used = 0
    for row, markdown in previews:
        room = min(PREVIEW_DOC_CHARS, PREVIEW_TOTAL_CHARS - used)
        if room < 500:  # not enough left to show anything useful of this document
            break
        part = document_preview(row.source, markdown, room, note=f"doc {row.doc_id} · {row.state}")
        parts.append(part)
        used += len(part)
    if not parts:
        return "(no output yet)"
    if documents > len(parts):
        parts.append(
            f"*… {len(parts)} of {documents} documents previewed, in batch order; every document.md is listed in "
            "the documents table*"
        )
    return "\n\n---\n\n".join(parts)


def vlm_metadata(
    summary: Any, rows: Sequence[DocumentRow], previews: Sequence[tuple[DocumentRow, str]], documents: int
) -> dict[str, Any]:
    """The materialization's metadata from the stage's summary and the batch's rows and previews."""

    def seconds(value: float | None) -> float | str:
        return round(value, 3) if value is not None else "n/a"

    failed_rows = [
        [row["source"], row["page"], row["reason"], row["attempts"], row["message"][:200]]
        for row in summary.failure_rows
    ]
    metadata: dict[str, Any] = {
        "documents": documents,
        "pages": summary.pages_total,
        "pages_processed": summary.processed,
        "pages_cached": summary.cached,
        # GPU pages and text pages (read from the text layer by parsed_pages), for the batch and per document
        "pages_vlm": summary.routes.get("vlm", 0),
        "pages_text": summary.routes.get("text", 0),
        "pages_by_route": dg.MetadataValue.json(summary.routes_by_document),
        "pages_failed": summary.failed,
        # VLM pages that still failed and were given their text layer instead (answers.text_fallback): flagged,
        # budgeted per document, asked again on the next run
        "pages_fallback": summary.fallback,
        "fallback_by_document": dg.MetadataValue.json(summary.fallback_by_document),
        "over_fallback_budget": dg.MetadataValue.json(summary.over_fallback_budget),
        "failed_page_rate": round(summary.failed_page_rate, 5),
        "failure_reasons": dg.MetadataValue.json(dict(summary.failure_reasons)),
        "failed_pages": dg.MetadataValue.md(
            markdown_table(["document", "page", "reason", "attempts", "message"], failed_rows)
            + (f"\n\n(first {len(failed_rows)} of {summary.failed})" if summary.failed > len(failed_rows) else "")
        ),
        "requests": summary.requests,
        "unreadable_records": dg.MetadataValue.json(summary.unreadable_records[:MAX_LISTED]),
        "peak_page_mib": round(summary.peak_page_bytes / 2**20, 1),
        "pages_per_second": round(summary.pages_per_s, 3),
        "latency_p50_s": seconds(summary.latency_quantile(0.50)),
        "latency_p95_s": seconds(summary.latency_quantile(0.95)),
        "model": summary.model,
        "engine": summary.engine,
        "server_url": dg.MetadataValue.url(summary.server_url),
        "documents_table": documents_table(rows),
    }
    if documents > len(rows):
        metadata["documents_table_note"] = f"first {len(rows)} of {documents} documents listed"
    for row in rows[:MAX_LINKS]:
        metadata[f"document.md: {row.source}"] = dg.MetadataValue.url(row.document_md)
    metadata["documents_state"] = dg.MetadataValue.json(summary.documents)
    metadata["preview"] = dg.MetadataValue.md(batch_preview(previews, documents))
    return metadata


def vlm_batch_metadata(
    storage: Any, manifest: Mapping[str, Any], doc_ids: Sequence[str], summary: Any
) -> dict[str, Any]:
    """``vlm_outputs``' metadata: the summary, a row per document (its ``status.json``) and the previews."""
    rows = read_documents(storage, doc_ids, sources_of(manifest), summary, export_dir=export_root())
    return vlm_metadata(summary, rows, read_previews(storage, rows), len(doc_ids))


# ---- the other assets and the bucket check ---------------------------------------------------------------------


def ingest_metadata(summary: Any, storage: Any, batch_id: str) -> dict[str, Any]:
    """``raw_pdfs``' metadata from the ingest stage's summary."""
    rejected_rows = [[key.rsplit("/", 1)[-1], r["reason"], r["message"]] for key, r in summary.rejected.items()]
    return {
        "documents": len(summary.doc_ids),
        "pages": sum(summary.pages.values()),
        "rejected": len(summary.rejected),
        "errors": len(summary.errors),
        "duplicates": summary.duplicates,
        # replaced in incoming/ while this batch read them: the new version is the sensor's next work
        "superseded": dg.MetadataValue.json(summary.superseded),
        "drained": summary.drained,
        "doc_ids": dg.MetadataValue.json(summary.accepted),
        "rejections": dg.MetadataValue.md(markdown_table(["file", "reason", "message"], rejected_rows)),
        "batch_manifest": storage.uri(storage.batch_key(batch_id)),
    }


def pages_metadata(summary: Any, routing_mode: str, image_longest_side_px: int) -> dict[str, Any]:
    """``parsed_pages``' metadata from the render stage's summary and the routing and image size it used."""
    return {
        "documents": len(summary.documents) + len(summary.failures),
        "rendered": summary.rendered,
        "already_rendered": summary.skipped,
        "pages": summary.pages,
        # GPU pages and text pages, for the batch and per document (a batch holds at most workers.batch_size)
        "pages_vlm": summary.pages_by_route.get("vlm", 0),
        "pages_text": summary.pages_by_route.get("text", 0),
        "pages_by_route": dg.MetadataValue.json(
            {d.doc_id: {"text": d.routes.get("text", 0), "vlm": d.routes.get("vlm", 0)} for d in summary.documents}
        ),
        "vision_tokens": summary.vision_tokens,
        "routing_mode": routing_mode,
        "image_longest_side_px": image_longest_side_px,
        "failed_pages": dg.MetadataValue.json(summary.failed_pages),
        "failed_documents": dg.MetadataValue.json(summary.failures),
    }


def _rounded(value: float | None) -> float | str:
    return round(value, 4) if value is not None else "n/a"


def quality_summary(report: Any) -> str:
    """The step log's one line about a quality report."""
    return (
        f"mean similarity vs baseline {_rounded(report.mean_baseline_similarity)}, "
        f"vs text layer {_rounded(report.mean_text_layer_similarity)}"
    )


def quality_metadata(report: Any, storage: Any, batch_id: str) -> dict[str, Any]:
    """``quality_baseline_diffs``' metadata from the comparison's report."""
    day = report.created_at[:10]
    return {
        "mean_baseline_similarity": _rounded(report.mean_baseline_similarity),
        "mean_text_layer_similarity": _rounded(report.mean_text_layer_similarity),
        "pages_compared": sum(1 for p in report.pages if p.status == "compared"),
        "pages_without_output": report.missing_outputs,
        "report": dg.MetadataValue.md(report.to_markdown()),
        "report_uri": storage.uri(storage.quality_report_key(day, f"{batch_id}.json")),
    }


def audit_metadata(report: Any, findings: Sequence[Any], batch_id: str | None, rows: int) -> dict[str, Any]:
    """``bucket_accounting``'s metadata: the audit's counts and its first ``rows`` findings, errors first."""
    from mkg_pipeline.audit import ERROR, WARNING

    return {
        "errors": len(report.of(ERROR)),
        "warnings": len(report.of(WARNING)),
        "pending": sum(report.pending.values()),
        "pages_done": report.counts["pages_done"],
        "pages_failed": report.counts["pages_failed"],
        "findings": dg.MetadataValue.md(
            markdown_table(
                ["severity", "finding", "where", "what is wrong", "what to do"],
                ((f.severity, f.kind, f.subject, f.message, f.action) for f in findings[:rows]),
            )
        ),
        "scope": report.scope,
        "command": "python -m mkg_pipeline.audit" + (f" --batch {batch_id}" if batch_id else ""),
    }
