"""Both engines against the real local VLM server: every request goes through our guarded client.

OCR quality is asserted once per engine route, elsewhere: the page-to-Markdown
route in test_local_server.py (similarity and reading order), MinerU's
layout + recognition route in test_mineru_reference_client.py (MinerU's own
client, figures and tables). Here, cheap pages only.
"""

from __future__ import annotations

import pytest

from mkg_pipeline.config import VLLMServerConfig
from mkg_pipeline.engines import build_engine
from mkg_pipeline.vllm.client import VLLMClient
from mkg_pipeline.vllm.metrics import REGISTRY
from mkg_pipeline_tests.fixtures.local_server import render_corpus_page

pytestmark = pytest.mark.integration

ENGINES = ["page_markdown", "mineru"]


def _client(server) -> VLLMClient:
    return VLLMClient(VLLMServerConfig(url=server.url, model=server.model, api_key=server.api_key))


def _requests_sent() -> float:
    """Chat-completion attempts our client made, from its own histogram (all label sets)."""
    total = 0.0
    for family in REGISTRY.collect():
        if family.name == "mineru_vllm_request_duration_seconds":
            total += sum(s.value for s in family.samples if s.name.endswith("_count"))
    return total


@pytest.mark.parametrize("engine_name", ENGINES)
async def test_every_request_goes_through_the_guarded_client(engine_name: str, local_vlm_server) -> None:
    png = render_corpus_page("minimal-document.pdf", 0, dpi=100)
    before = _requests_sent()
    async with _client(local_vlm_server) as client:
        engine = build_engine(engine_name, client, "v1")
        result = await engine.extract(png, label="test minimal-document page=1")
    assert "Lorem ipsum" in result.markdown
    assert result.blocks
    # Every request went through our guarded client (MinerU's own transport is never used).
    assert _requests_sent() - before == result.requests
    if engine_name == "mineru":
        assert result.requests >= 2  # layout detection, then at least one recognition
        assert all(b.bbox is not None and 0 <= b.bbox[0] < b.bbox[2] <= 1 for b in result.blocks)


@pytest.mark.parametrize("engine_name", ENGINES)
async def test_tiny_image_pages_neither_crash_nor_hang(engine_name: str, local_vlm_server) -> None:
    async with _client(local_vlm_server) as client:
        engine = build_engine(engine_name, client, "v1")
        for index in range(6):
            png = render_corpus_page("scanned-images-6p.pdf", index, dpi=150)
            result = await engine.extract(png, label=f"scanned-images page={index + 1}")
            assert isinstance(result.markdown, str)
