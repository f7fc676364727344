"""quality_baseline_diffs: similarity to the golden baseline and to the text layer, with a readable report."""

# No `from __future__ import annotations`: Dagster reads the config/context annotations at definition time.
import dagster as dg

from mkg_pipeline.orchestration.assets.partitions import ingest_batches
from mkg_pipeline.orchestration.assets.vlm import vlm_outputs
from mkg_pipeline.orchestration.checks import evaluate_quality, quality_check_specs
from mkg_pipeline.orchestration.resources import S3StorageResource, VLLMResource


class QualityDiffConfig(dg.Config):
    doc_ids: list[str] = []
    """Only these documents of the batch (empty: all)."""
    baseline_set: str = "default"
    """Which golden baseline to compare with (baseline/<set>/...)."""


@dg.asset(
    partitions_def=ingest_batches,
    deps=[vlm_outputs],
    group_name="pdf_to_markdown",
    kinds={"s3"},
    check_specs=quality_check_specs,
    description="Step 4 of 4. Per page normalised similarity of the Markdown vs the golden baseline "
    "(`baseline/<set>/`, made by promote_baseline_job) and vs the PDF text layer (born-digital pages); the report "
    "is in `quality/<date>/<batch>.{json,md}` and in the `report` metadata. A batch with no golden page or no text "
    "layer compares nothing: its check warns 'nothing compared' instead of passing. The daily "
    "baseline_quality_job re-runs the golden set against the live server and compares it here.",
)
def quality_baseline_diffs(
    context: dg.AssetExecutionContext, config: QualityDiffConfig, s3: S3StorageResource, vllm: VLLMResource
) -> dg.MaterializeResult:
    from mkg_pipeline.engines.base import engine_identity
    from mkg_pipeline.orchestration.metadata import quality_metadata, quality_summary
    from mkg_pipeline.quality.diff import compare_documents
    from mkg_pipeline.stages.batches import accepted_doc_ids, read_batch_manifest

    storage, settings = s3.storage(), vllm.pipeline_config()
    identity = engine_identity(settings.engine, settings.vllm.model, settings.prompt_version)
    doc_ids = accepted_doc_ids(read_batch_manifest(storage, context.partition_key), config.doc_ids)
    report = compare_documents(storage, context.partition_key, doc_ids, identity, config.baseline_set)
    context.log.info(quality_summary(report))
    thresholds = settings.quality
    return dg.MaterializeResult(
        metadata=quality_metadata(report, storage, context.partition_key),
        check_results=evaluate_quality(
            report, thresholds.min_baseline_similarity, thresholds.min_text_layer_similarity
        ),
    )
