"""Both engines against the real local VLM server, on real corpus pages."""

from __future__ import annotations

import pymupdf
import pytest

from mkg_pipeline.config import VLLMServerConfig
from mkg_pipeline.engines import build_engine
from mkg_pipeline.quality import similarity
from mkg_pipeline.vllm.client import VLLMClient
from mkg_pipeline.vllm.metrics import REGISTRY
from mkg_pipeline_tests.fixtures.corpus import corpus_pdf
from mkg_pipeline_tests.fixtures.local_server import render_corpus_page

pytestmark = pytest.mark.integration

ENGINES = ["page_markdown", "mineru"]


def _client(server) -> VLLMClient:
    return VLLMClient(VLLMServerConfig(url=server.url, model=server.model, api_key=server.api_key))


def _text_layer(name: str, index: int) -> str:
    with pymupdf.open(corpus_pdf(name)) as doc:
        return doc[index].get_text()


def _requests_sent() -> float:
    """Chat-completion attempts our client made, from its own histogram (all label sets)."""
    total = 0.0
    for family in REGISTRY.collect():
        if family.name == "mineru_vllm_request_duration_seconds":
            total += sum(s.value for s in family.samples if s.name.endswith("_count"))
    return total


@pytest.mark.parametrize("engine_name", ENGINES)
@pytest.mark.parametrize("name", ["pdflatex-4-pages.pdf", "wang-answer-validation-5p.pdf"])
async def test_born_digital_page_matches_text_layer(engine_name: str, name: str, local_vlm_server) -> None:
    png = render_corpus_page(name, 0, dpi=150)
    before = _requests_sent()
    async with _client(local_vlm_server) as client:
        engine = build_engine(engine_name, client, "v1")
        result = await engine.extract(png, label=f"test {name} page=1")
    score = similarity(result.markdown, _text_layer(name, 0))
    print(f"{engine_name} {name} p1: similarity {score:.3f}, {result.requests} request(s)")
    assert score >= 0.90
    assert result.blocks
    # Every request went through our guarded client (MinerU's own transport is never used).
    assert _requests_sent() - before == result.requests
    if engine_name == "mineru":
        assert result.requests >= 2  # layout detection, then at least one recognition
        assert all(b.bbox is not None and 0 <= b.bbox[0] < b.bbox[2] <= 1 for b in result.blocks)


@pytest.mark.parametrize("engine_name", ENGINES)
async def test_scanned_page_returns_its_text(engine_name: str, local_vlm_server) -> None:
    png = render_corpus_page("edgar-scanned.pdf", 0, dpi=150)
    async with _client(local_vlm_server) as client:
        result = await build_engine(engine_name, client, "v1").extract(png, label="edgar-scanned page=1")
    assert len(result.markdown.split()) > 50


@pytest.mark.parametrize("engine_name", ENGINES)
async def test_tiny_image_pages_neither_crash_nor_hang(engine_name: str, local_vlm_server) -> None:
    async with _client(local_vlm_server) as client:
        engine = build_engine(engine_name, client, "v1")
        for index in range(6):
            png = render_corpus_page("scanned-images-6p.pdf", index, dpi=150)
            result = await engine.extract(png, label=f"scanned-images page={index + 1}")
            assert isinstance(result.markdown, str)
