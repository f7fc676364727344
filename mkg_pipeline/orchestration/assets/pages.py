"""parsed_pages: page PNGs, text layer and a page manifest per document."""

# No `from __future__ import annotations`: Dagster reads the config/context annotations at definition time.
import dagster as dg

from mkg_pipeline.config import get_settings
from mkg_pipeline.orchestration.assets.ingest import raw_pdfs
from mkg_pipeline.orchestration.assets.partitions import claimed_batch, ingest_batches
from mkg_pipeline.orchestration.resources import S3StorageResource


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
    description="Step 2 of 4. Each page of the batch's accepted documents gets its route (routing.mode; `text`: a "
    "trustworthy text layer, read here by the text engine, no GPU, its result stored as a finished page under "
    "`vlm/<doc_id>/pages/`; `vlm`: rendered to `pages/<doc_id>/<n>.png` at the engine's image size, "
    "page_images) by a pool of worker processes (one per CPU, pages streamed to S3 as they are drawn, each "
    "document limited to workers.timeout_s). `pages/<doc_id>/manifest.json` is written last, so a document "
    "with a manifest is complete and is skipped next time (config `force` re-renders); a document that cannot "
    "be rendered gets `pages/<doc_id>/failure.json` instead.",
)
def parsed_pages(
    context: dg.AssetExecutionContext, config: ParsedPagesConfig, s3: S3StorageResource
) -> dg.MaterializeResult:
    from mkg_pipeline.stages.pages import NothingRendered, render_batch

    storage = s3.storage()
    settings = get_settings()
    try:
        with claimed_batch(context, storage):
            summary = render_batch(
                storage,
                context.partition_key,
                settings.pdf,
                settings.workers,
                doc_ids=config.doc_ids or None,
                force=config.force,
                progress=context.log.info,
                routing=settings.routing,
                image=settings.page_images.for_engine(settings.engine),
            )
    except NothingRendered as exc:
        raise dg.Failure(description=f"batch {context.partition_key}: {exc}") from exc
    return dg.MaterializeResult(
        metadata={
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
            "routing_mode": settings.routing.mode,
            "image_longest_side_px": settings.page_images.for_engine(settings.engine).longest_side_px,
            "failed_pages": dg.MetadataValue.json(summary.failed_pages),
            "failed_documents": dg.MetadataValue.json(summary.failures),
        }
    )
