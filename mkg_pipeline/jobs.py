"""Jobs: the ingest job the sensor launches, the daily baseline-quality job, and baseline promotion."""

# No `from __future__ import annotations`: Dagster reads the config/context annotations at definition time.
import dagster as dg

from mkg_pipeline.assets import ingest_batches, pipeline_assets, quality_baseline_diffs, vlm_outputs
from mkg_pipeline.config import get_settings
from mkg_pipeline.resources import S3StorageResource, VLLMResource

GOLDEN_PREFIX = "golden-"

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


def golden_partition(set_name: str) -> str:
    return f"{GOLDEN_PREFIX}{set_name}"


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
    from mkg_pipeline.stages.batches import accepted_doc_ids, read_batch_manifest
    from mkg_pipeline.stages.quality_diff import promote_to_baseline

    storage = s3.storage()
    settings = vllm.pipeline_config()
    manifest = read_batch_manifest(storage, config.batch_id)
    if config.doc_ids:
        doc_ids = accepted_doc_ids(manifest, config.doc_ids)
    else:
        sources = get_settings().quality.golden_set if config.sources is None else config.sources
        by_source = {
            key.rsplit("/", 1)[-1]: r["doc_id"]
            for key, r in manifest.get("results", {}).items()
            if r.get("status") == "accepted"
        }
        doc_ids = (
            list(dict.fromkeys(by_source.values()))
            if not sources
            else [by_source[s] for s in sources if s in by_source]
        )
        if not doc_ids:
            raise dg.Failure(
                description=f"batch {config.batch_id} holds none of {sources}; it holds {sorted(by_source)}"
            )
    identity = engine_identity(settings.engine, settings.vllm.model, settings.prompt_version)
    promoted = promote_to_baseline(storage, doc_ids, identity, config.set_name, origin=config.batch_id)

    # The golden set becomes a batch of its own, so the daily job can run the same assets over it.
    partition = golden_partition(config.set_name)
    golden_key = storage.batch_key(partition)
    previous = storage.get_json(golden_key) if storage.exists(golden_key) else {"doc_ids": []}
    storage.put_json(
        golden_key,
        {
            "batch_id": partition,
            "origin": f"promote_baseline from {config.batch_id}",
            "objects": [],
            "results": {},
            "doc_ids": list(dict.fromkeys([*previous.get("doc_ids", []), *promoted])),
        },
    )
    context.instance.add_dynamic_partitions(ingest_batches.name, [partition])
    context.log.info(f"promoted {promoted} to baseline set {config.set_name!r}; golden batch {partition}")
    return dg.Output(promoted, metadata={"promoted": dg.MetadataValue.json(promoted), "golden_batch": partition})


@dg.job(description="Make a batch's current outputs the golden baseline that quality_baseline_diffs compares with.")
def promote_baseline_job() -> None:
    promote_baseline()
