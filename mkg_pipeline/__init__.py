"""mkg-pipeline: PDFs → page images → VLM Markdown, orchestrated by Dagster.

Importing this package must stay cheap (run pods start in seconds): no OCR
models, ONNX runtimes or MinerU here. The Dagster code location is
:mod:`mkg_pipeline.definitions`.
"""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # `dagster ... -m mkg_pipeline` finds `defs` here, while `import mkg_pipeline.config` stays Dagster-free.
    if name == "defs":
        from mkg_pipeline.definitions import defs

        return defs
    raise AttributeError(f"module 'mkg_pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), "defs"]
