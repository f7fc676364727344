"""mkg-pipeline: PDFs → page images → VLM Markdown, orchestrated by Dagster.

Importing this package must stay cheap (run pods start in seconds): no OCR
models, ONNX runtimes or MinerU here. The Dagster code location is
:mod:`mkg_pipeline.orchestration.definitions`.
"""

__version__ = "0.1.0"


# The one lazy hook left, and why: `dagster ... -m mkg_pipeline` imports this package and looks
# for a Definitions object among its members (`inspect.getmembers`, hence `__dir__`); `-a defs`
# is a plain getattr. Nothing redirects that loader to a submodule, and importing `defs` eagerly here
# would load Dagster into every `import mkg_pipeline.config` (run pods' health checks, tools).
# `-m mkg_pipeline.orchestration.definitions` (what the k8s code location runs) needs no hook.
def __getattr__(name: str) -> object:
    if name == "defs":
        from mkg_pipeline.orchestration.definitions import defs

        return defs
    raise AttributeError(f"module 'mkg_pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), "defs"]
