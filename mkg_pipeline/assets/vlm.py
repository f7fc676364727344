"""vlm_outputs: Markdown and a MinerU-style content list per document, one cached page at a time."""

# No `from __future__ import annotations`: Dagster reads the config/context annotations at definition time.
import asyncio

import dagster as dg

from mkg_pipeline.assets.pages import parsed_pages
from mkg_pipeline.assets.partitions import ingest_batches
from mkg_pipeline.checks import evaluate_page_accounting, vlm_output_check_specs
from mkg_pipeline.resources import S3StorageResource, VLLMResource

PREVIEW_CHARS = 3000


class VLMOutputsConfig(dg.Config):
    doc_ids: list[str] = []
    """Only these documents of the batch (empty: all) — to re-run a single document."""
    force_refresh: bool = False
    """Ignore the page cache and ask the server again (the daily baseline job does, to catch regressions)."""


@dg.asset(
    partitions_def=ingest_batches,
    deps=[parsed_pages],
    group_name="pdf_to_markdown",
    kinds={"s3", "vllm"},
    pool="vllm",
    check_specs=vlm_output_check_specs,
    description="Every page sent through the VLLMResource's engine (cached by page image + model + engine + "
    "prompt version); failed pages are recorded with their reason and retried next time; document.md and "
    "content.json assembled per document.",
)
def vlm_outputs(
    context: dg.AssetExecutionContext, config: VLMOutputsConfig, s3: S3StorageResource, vllm: VLLMResource
) -> dg.MaterializeResult:
    from mkg_pipeline.pipeline_metrics import push_metrics
    from mkg_pipeline.stages.batches import accepted_doc_ids, read_batch_manifest
    from mkg_pipeline.stages.vlm import process_documents

    storage = s3.storage()
    settings = vllm.pipeline_config()
    doc_ids = accepted_doc_ids(read_batch_manifest(storage, context.partition_key), config.doc_ids)
    context.log.info(
        f"{len(doc_ids)} document(s) → {settings.engine} engine, model {settings.vllm.model} at {settings.vllm.url}"
    )

    async def run():  # type: ignore[no-untyped-def]
        async with vllm.open_engine() as (client, engine):
            if not await client.health_check():
                context.log.warning(
                    f"{client.server_url}/health is not answering 200; pages will fail fast and be retried later"
                )
            return await process_documents(
                storage,
                engine,
                doc_ids,
                server_url=client.server_url,
                model=client.model,
                max_pages_in_flight=settings.vllm.max_in_flight,
                force_refresh=config.force_refresh,
                progress=context.log.info,
            )

    summary = asyncio.run(run())
    push_metrics(grouping_key={"partition": context.partition_key, "asset": "vlm_outputs"})

    def seconds(value: float | None) -> float | str:
        return round(value, 3) if value is not None else "n/a"

    failed_rows = "\n".join(
        f"| {d.source} | {f['page']} | {f['reason']} | {f['attempts']} | {f['message'][:200]} |"
        for d in summary.documents
        for f in d.failed_pages
    )
    preview = next(iter(summary.previews.values()), "")
    return dg.MaterializeResult(
        metadata={
            "documents": len(summary.documents),
            "pages": sum(d.pages_total for d in summary.documents),
            "pages_processed": summary.count("done"),
            "pages_cached": summary.count("cached"),
            "pages_failed": sum(len(d.failed_pages) for d in summary.documents),
            "failure_reasons": dg.MetadataValue.json(summary.failure_reasons),
            "failed_pages": dg.MetadataValue.md(
                "| document | page | reason | attempts | message |\n|---|---|---|---|---|\n" + failed_rows
                if failed_rows
                else "none"
            ),
            "requests": summary.requests,
            "pages_per_second": round(summary.pages_per_s, 3),
            "latency_p50_s": seconds(summary.latency_quantile(0.50)),
            "latency_p95_s": seconds(summary.latency_quantile(0.95)),
            "model": summary.model,
            "engine": summary.engine,
            "server_url": summary.server_url,
            "documents_state": dg.MetadataValue.json({d.doc_id: d.state for d in summary.documents}),
            "preview": dg.MetadataValue.md(preview[:PREVIEW_CHARS] or "(no output yet)"),
        },
        check_results=evaluate_page_accounting(summary),
    )
