"""Jobs: the ingest job the sensor launches, the daily baseline-quality job, and baseline promotion.

Thin: promotion itself is ``stages/baseline.py``.
"""

# No `from __future__ import annotations`: Dagster reads the config/context annotations at definition time.
import dagster as dg

from mkg_pipeline.orchestration.assets import ingest_batches, pipeline_assets, quality_baseline_diffs, vlm_outputs
from mkg_pipeline.orchestration.resources import S3StorageResource, VLLMResource
from mkg_pipeline.quality.baseline import GOLDEN_PREFIX, golden_partition

__all__ = ["GOLDEN_PREFIX", "baseline_quality_job", "golden_partition", "ingest_job", "promote_baseline_job"]

ingest_job = dg.define_asset_job(
    "ingest_job",
    selection=dg.AssetSelection.assets(*pipeline_assets),
    partitions_def=ingest_batches,
    description="One ingestion batch end to end: validate, render, VLM, quality.",
)

baseline_quality_job = dg.define_asset_job(
    "baseline_quality_job",
    selection=dg.AssetSelection.assets(vlm_outputs, quality_baseline_diffs),
    partitions_def=ingest_batches,
    # Ask the server again instead of reading the page cache: the point is to notice when answers change.
    config={"ops": {"vlm_outputs": {"config": {"force_refresh": True}}}},
    description="Re-run the golden set against the live server and compare with the golden baseline.",
)


class PromoteBaselineConfig(dg.Config):
    batch_id: str
    """The ingestion batch whose current outputs become the golden baseline."""
    doc_ids: list[str] = []
    """Documents to promote (empty: those whose source name is in `sources`)."""
    sources: list[str] | None = None
    """Source file names to promote (None: quality.golden_set from the configuration; [] : every document)."""
    set_name: str = "default"


@dg.op(description="Copy the chosen documents' outputs into baseline/<set>/ and register the golden batch.")
def promote_baseline(
    context: dg.OpExecutionContext, config: PromoteBaselineConfig, s3: S3StorageResource, vllm: VLLMResource
) -> dg.Output[dict]:
    from mkg_pipeline.engines.base import engine_identity
    from mkg_pipeline.quality.baseline import PromotionError, promote_batch

    settings = vllm.pipeline_config()
    try:
        promotion = promote_batch(
            s3.storage(),
            config.batch_id,
            engine_identity(settings.engine, settings.vllm.model, settings.prompt_version),
            doc_ids=config.doc_ids,
            sources=settings.quality.golden_set if config.sources is None else config.sources,
            set_name=config.set_name,
        )
    except PromotionError as exc:
        raise dg.Failure(description=str(exc)) from None
    # The golden set is a batch of its own, so the daily job can run the same assets over it.
    context.instance.add_dynamic_partitions(ingest_batches.name, [promotion.golden_batch])
    context.log.info(
        f"promoted {promotion.promoted} to baseline set {config.set_name!r}; golden batch {promotion.golden_batch}"
    )
    return dg.Output(
        promotion.promoted,
        metadata={"promoted": dg.MetadataValue.json(promotion.promoted), "golden_batch": promotion.golden_batch},
    )


@dg.job(description="Make a batch's current outputs the golden baseline that quality_baseline_diffs compares with.")
def promote_baseline_job() -> None:
    promote_baseline()
