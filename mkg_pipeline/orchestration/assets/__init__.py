"""The Dagster asset graph: raw_pdfs → parsed_pages → vlm_outputs → quality_baseline_diffs."""

from mkg_pipeline.orchestration.assets.ingest import raw_pdfs
from mkg_pipeline.orchestration.assets.pages import parsed_pages
from mkg_pipeline.orchestration.assets.partitions import INGEST_BATCHES, ingest_batches
from mkg_pipeline.orchestration.assets.quality import quality_baseline_diffs
from mkg_pipeline.orchestration.assets.vlm import vlm_outputs

pipeline_assets = [raw_pdfs, parsed_pages, vlm_outputs, quality_baseline_diffs]

__all__ = [
    "INGEST_BATCHES",
    "ingest_batches",
    "parsed_pages",
    "pipeline_assets",
    "quality_baseline_diffs",
    "raw_pdfs",
    "vlm_outputs",
]
