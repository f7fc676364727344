"""vlm_outputs: Markdown and MinerU's content list per document, streamed page by page through the server."""

# No `from __future__ import annotations`: Dagster reads the config/context annotations at definition time.
import asyncio

import dagster as dg

from mkg_pipeline.orchestration.assets.pages import parsed_pages
from mkg_pipeline.orchestration.assets.partitions import claimed_batch, ingest_batches
from mkg_pipeline.orchestration.checks import evaluate_vlm_checks, vlm_output_check_specs
from mkg_pipeline.orchestration.resources import S3StorageResource, VLLMResource


class VLMOutputsConfig(dg.Config):
    doc_ids: list[str] = []
    """Only these documents of the batch (empty: all) — to re-run a single document."""
    force_refresh: bool = False
    """Ignore the page cache and ask the server again (the daily baseline job does, to catch regressions)."""


async def _process_batch(  # type: ignore[no-untyped-def]
    context: dg.AssetExecutionContext, vllm: VLLMResource, storage, doc_ids: list[str], force_refresh: bool, claim
):
    """The VLM stage over the batch's documents, through the resource's client and engine."""
    from mkg_pipeline.stages.vlm import process_documents

    async with vllm.open_engine() as (client, engine):
        context.log.info(f"{len(doc_ids)} document(s) → {engine.identity} at {client.server_url}")
        if not await client.health_check():
            context.log.warning(
                f"{client.server_url}/health is not answering 200; pages will fail fast and be retried later"
            )
        return await process_documents(
            storage,
            engine,
            doc_ids,
            client.limiter,
            server_url=client.server_url,
            model=client.model,
            run_id=context.run_id,
            force_refresh=force_refresh,
            progress=context.log.info,
            claim=claim,
            memory_budget=vllm.pipeline_config().workers.vlm_page_memory_mb * 1024 * 1024,
        )


@dg.asset(
    partitions_def=ingest_batches,
    deps=[parsed_pages],
    group_name="pdf_to_markdown",
    kinds={"s3", "vllm"},
    pool="vllm",
    check_specs=vlm_output_check_specs,
    description="Every page sent through the VLLMResource's engine (cached by page image + model + engine + "
    "prompt version); failed pages are recorded with their reason and retried next time; document.md, "
    "content_list.json and status.json assembled per document as soon as its last page finishes.",
)
def vlm_outputs(
    context: dg.AssetExecutionContext, config: VLMOutputsConfig, s3: S3StorageResource, vllm: VLLMResource
) -> dg.MaterializeResult:
    from mkg_pipeline.metrics.pipeline import push_metrics
    from mkg_pipeline.orchestration.metadata import vlm_batch_metadata
    from mkg_pipeline.stages.batches import accepted_doc_ids, read_batch_manifest
    from mkg_pipeline.stages.vlm import ClaimLost, DocumentsNotProcessed, StorageUnavailable

    storage, settings = s3.storage(), vllm.pipeline_config()
    manifest = read_batch_manifest(storage, context.partition_key)
    doc_ids = accepted_doc_ids(manifest, config.doc_ids)
    try:
        with claimed_batch(context, storage, settings.workers.lease_ttl_s) as lease:
            summary = asyncio.run(_process_batch(context, vllm, storage, doc_ids, config.force_refresh, lease.check))
    except (StorageUnavailable, DocumentsNotProcessed) as exc:
        raise dg.Failure(description=str(exc)) from None
    except ClaimLost as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    finally:
        push_metrics(grouping_key={"partition": context.partition_key, "asset": "vlm_outputs"})
    return dg.MaterializeResult(
        metadata=vlm_batch_metadata(storage, manifest, doc_ids, summary),
        check_results=evaluate_vlm_checks(summary, settings.quality.max_failed_page_rate),
    )
