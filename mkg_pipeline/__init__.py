"""mkg-pipeline: PDFs → page images → VLM Markdown, orchestrated by Dagster.

Importing this package must stay cheap (run pods start in seconds): no OCR
models, ONNX runtimes or MinerU here. The Dagster code location is
:mod:`mkg_pipeline.definitions`.
"""

__version__ = "0.1.0"
