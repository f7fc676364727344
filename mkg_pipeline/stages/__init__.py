"""The pipeline's work, one module per asset, free of Dagster.

Each stage reads and writes S3 through :class:`mkg_pipeline.storage.Storage` and
returns a plain summary that the thin Dagster assets turn into metadata.
"""
