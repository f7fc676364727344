"""parsed_pages: page PNGs, text layer and a page manifest per document."""

# No `from __future__ import annotations`: Dagster reads the config/context annotations at definition time.
import dagster as dg

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
    from mkg_pipeline.orchestration.metadata import pages_metadata
    from mkg_pipeline.stages.pages import NothingRendered, render_batch

    storage, settings = s3.storage(), s3.pipeline_config()
    image = settings.page_images.for_engine(settings.engine)
    try:
        with claimed_batch(context, storage, settings.workers.lease_ttl_s):
            summary = render_batch(
                storage,
                context.partition_key,
                settings.pdf,
                settings.workers,
                doc_ids=config.doc_ids or None,
                force=config.force,
                progress=context.log.info,
                routing=settings.routing,
                image=image,
            )
    except NothingRendered as exc:
        raise dg.Failure(description=f"batch {context.partition_key}: {exc}") from exc
    return dg.MaterializeResult(metadata=pages_metadata(summary, settings.routing.mode, image.longest_side_px))
