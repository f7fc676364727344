"""Page image → Markdown engines. No Dagster here; heavy imports happen in the engine that needs them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mkg_pipeline.engines.base import AnswerRejected, PageEngine, PageInput, PageResult, page_cache_key

if TYPE_CHECKING:
    from mkg_pipeline.config import MinerUConfig
    from mkg_pipeline.vllm.client import VLLMClient

ENGINE_NAMES = ("mineru", "page_markdown")


def build_engine(name: str, client: VLLMClient, settings: MinerUConfig) -> PageEngine:
    """The engine called ``name``, sending every request through ``client``."""
    if name == "page_markdown":
        from mkg_pipeline.engines.page_markdown import PageMarkdownEngine

        return PageMarkdownEngine(client, settings)
    raise ValueError(f"unknown engine {name!r}; expected one of {', '.join(ENGINE_NAMES)}")


__all__ = ["ENGINE_NAMES", "AnswerRejected", "PageEngine", "PageInput", "PageResult", "build_engine", "page_cache_key"]
