"""parsed_pages: page PNGs, text layer and a page manifest per document."""

# No `from __future__ import annotations`: Dagster reads the config/context annotations at definition time.
import dagster as dg

from mkg_pipeline.assets.ingest import raw_pdfs
from mkg_pipeline.assets.partitions import ingest_batches
from mkg_pipeline.config import get_settings
from mkg_pipeline.resources import S3StorageResource


class ParsedPagesConfig(dg.Config):
    doc_ids: list[str] = []
    """Only these documents of the batch (empty: all)."""
    force: bool = False
    """Re-render even documents that already have a complete page manifest."""


@dg.asset(
    partitions_def=ingest_batches,
    deps=[raw_pdfs],
    group_name="pdf_to_markdown",
    kinds={"s3", "pymupdf"},
    description="Each page rendered to PNG at the configured DPI (one page in memory at a time), its text layer "
    "extracted, and pages/<doc_id>/manifest.json written last.",
)
def parsed_pages(
    context: dg.AssetExecutionContext, config: ParsedPagesConfig, s3: S3StorageResource
) -> dg.MaterializeResult:
    from mkg_pipeline.stages.batches import accepted_doc_ids, read_batch_manifest
    from mkg_pipeline.stages.pages import render_document

    storage = s3.storage()
    settings = get_settings()
    doc_ids = accepted_doc_ids(read_batch_manifest(storage, context.partition_key), config.doc_ids)
    rendered, skipped, pages, failed = 0, 0, 0, []
    for index, doc_id in enumerate(doc_ids, start=1):
        context.log.info(f"[{index}/{len(doc_ids)}] rendering {doc_id}")
        try:
            result = render_document(storage, doc_id, settings.pdf, force=config.force, progress=context.log.info)
        except Exception as exc:  # one broken document must not stop the others
            context.log.error(f"{doc_id}: rendering failed: {type(exc).__name__}: {exc}")
            failed.append({"doc_id": doc_id, "error": f"{type(exc).__name__}: {exc}"})
            continue
        skipped += result.skipped
        rendered += not result.skipped
        pages += result.pages
        failed.extend({"doc_id": doc_id, **f} for f in result.failed)
    if failed and len(failed) == len(doc_ids) and not pages:
        raise dg.Failure(description=f"no document of batch {context.partition_key} could be rendered: {failed}")
    return dg.MaterializeResult(
        metadata={
            "documents": len(doc_ids),
            "rendered": rendered,
            "already_rendered": skipped,
            "pages": pages,
            "dpi": settings.pdf.dpi,
            "failures": dg.MetadataValue.json(failed),
        }
    )
