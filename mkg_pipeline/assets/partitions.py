"""Partitioning by ingestion batch (see DESIGN.md, "Partitions and scale")."""

import dagster as dg

INGEST_BATCHES = "ingest_batches"

ingest_batches = dg.DynamicPartitionsDefinition(name=INGEST_BATCHES)
