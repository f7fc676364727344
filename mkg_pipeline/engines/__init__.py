"""Page image → Markdown engines. No Dagster here; heavy imports happen in the engine that needs them.

Engine names are listed once, in ``mkg_pipeline.config.EngineName`` (what the configuration accepts).
Engine ``<name>`` lives in module ``mkg_pipeline.engines.<name>``, which exports ``ENGINE_CLASS``:
adding an engine is adding the name to ``EngineName`` and writing that module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, get_args

from mkg_pipeline.config import EngineName
from mkg_pipeline.engines.base import (
    REJECT_REASONS,
    AnswerRejected,
    PageEngine,
    PageInput,
    PageResult,
    engine_identity,
    page_cache_key,
)

if TYPE_CHECKING:
    from mkg_pipeline.config import PipelineConfig
    from mkg_pipeline.vllm.client import VLLMClient

#: every engine the configuration accepts (from ``EngineName``), e.g. for a CLI's ``choices``
ENGINE_NAMES: tuple[str, ...] = get_args(EngineName)


def build_engine(name: str, client: VLLMClient, settings: PipelineConfig) -> PageEngine:
    """The engine called ``name``, sending every request through ``client``, configured by ``settings``
    (``prompt_version``, ``answers.max_tokens``, ``answers.max_reasks``, ``vllm.max_in_flight``)."""
    if name not in ENGINE_NAMES:
        raise ValueError(f"unknown engine {name!r}; expected one of {', '.join(ENGINE_NAMES)}")
    module = importlib.import_module(f"{__name__}.{name}")
    engine: PageEngine = module.ENGINE_CLASS(client, settings)
    return engine


__all__ = [
    "ENGINE_NAMES",
    "REJECT_REASONS",
    "AnswerRejected",
    "PageEngine",
    "PageInput",
    "PageResult",
    "build_engine",
    "engine_identity",
    "page_cache_key",
]
