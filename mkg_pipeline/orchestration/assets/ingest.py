"""raw_pdfs: validated, content-addressed PDFs of one ingestion batch."""

# No `from __future__ import annotations`: Dagster reads the config/context annotations at definition time.
import dagster as dg

from mkg_pipeline.orchestration.assets.partitions import claimed_batch, ingest_batches
from mkg_pipeline.orchestration.resources import S3StorageResource


class RawPdfsConfig(dg.Config):
    drain_incoming: bool = True
    """Remove ingested objects from incoming/ so the sensor only ever lists pending work."""


@dg.asset(
    partitions_def=ingest_batches,
    group_name="pdf_to_markdown",
    kinds={"s3", "pdf"},
    description="Step 1 of 4. The batch's objects from incoming/ (the sensor groups new files into batches; one "
    "partition per batch) validated in worker processes (not a PDF, encrypted, no readable pages, limits, "
    "workers.timeout_s) and stored as `raw/<doc_id>.pdf`, doc_id = first 16 hex of the file's sha256, so a file "
    "dropped twice is one document. Refused files get `rejected/<name>.json` with the reason (the `rejections` "
    "table). Each outcome is written to `batches/<batch>.json` (the `batch_manifest`, which maps file names to "
    "doc ids) before its object leaves incoming/. Re-materializing is safe: recorded outcomes are kept.",
)
def raw_pdfs(context: dg.AssetExecutionContext, config: RawPdfsConfig, s3: S3StorageResource) -> dg.MaterializeResult:
    from mkg_pipeline.orchestration.metadata import ingest_metadata
    from mkg_pipeline.stages.ingest import OutcomesNotRecorded, ingest_batch
    from mkg_pipeline.stages.lease import LeaseLost

    storage, settings = s3.storage(), s3.pipeline_config()
    try:
        with claimed_batch(context, storage, settings.workers.lease_ttl_s) as lease:
            summary = ingest_batch(
                storage,
                context.partition_key,
                settings.pdf,
                settings.workers,
                drain_incoming=config.drain_incoming,
                progress=context.log.info,
                claim=lease.check,
            )
    except OutcomesNotRecorded as exc:
        raise dg.Failure(description=str(exc)) from None
    except LeaseLost as exc:
        raise dg.Failure(
            description=f"{exc}. This run stopped before writing the batch manifest; the run that took the batch "
            "over records every outcome.",
            allow_retries=False,
        ) from None
    if summary.errors:
        context.log.warning(f"{len(summary.errors)} object(s) hit errors and will be retried: {summary.errors}")
    return dg.MaterializeResult(metadata=ingest_metadata(summary, storage, context.partition_key))
