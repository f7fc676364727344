"""Both engines against the real local VLM server, on real corpus pages."""

from __future__ import annotations

import io
import re

import jsonschema
import pymupdf
import pytest

from mkg_pipeline.config import MinerUConfig, VLLMServerConfig
from mkg_pipeline.engines import AnswerRejected, PageInput, PageResult, build_engine
from mkg_pipeline.outputs import CONTENT_LIST_SCHEMA
from mkg_pipeline.quality import similarity
from mkg_pipeline.vllm.client import VLLMClient
from mkg_pipeline.vllm.metrics import REGISTRY
from mkg_pipeline_tests.fixtures.corpus import corpus_pdf
from mkg_pipeline_tests.fixtures.local_server import render_corpus_page

pytestmark = pytest.mark.integration

ENGINES = ["page_markdown", "mineru"]
SETTINGS = MinerUConfig()


def _client(server) -> VLLMClient:
    return VLLMClient(VLLMServerConfig(url=server.url, model=server.model, api_key=server.api_key))


def _text_layer(name: str, index: int) -> str:
    with pymupdf.open(corpus_pdf(name)) as doc:
        return doc[index].get_text()


def _page(name: str, index: int) -> PageInput:
    return PageInput(
        png=render_corpus_page(name, index, dpi=150),
        page_idx=index,
        text_layer_chars=len(_text_layer(name, index).strip()),
        label=f"test {name} page={index + 1}",
    )


def _requests_sent() -> float:
    """Chat-completion attempts our client made, from its own histogram (all label sets)."""
    total = 0.0
    for family in REGISTRY.collect():
        if family.name == "mineru_vllm_request_duration_seconds":
            total += sum(s.value for s in family.samples if s.name.endswith("_count"))
    return total


def assert_mineru_compatible(result: PageResult, page_idx: int) -> None:
    """What holds for any page: a valid content list, and figures that exist, open and are linked."""
    from PIL import Image

    jsonschema.validate(result.content_list, CONTENT_LIST_SCHEMA)
    assert all(item["page_idx"] == page_idx for item in result.content_list)
    paths = {item["img_path"] for item in result.content_list if "img_path" in item}
    assert paths == set(result.images)
    for jpeg in result.images.values():
        assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
    for item in result.content_list:
        if item["type"] == "image":
            assert f"]({item['img_path']})" in result.markdown
        if item["type"] == "table" and item["table_body"]:
            assert item["table_body"].startswith("<table") and item["table_body"] in result.markdown


@pytest.mark.parametrize("engine_name", ENGINES)
@pytest.mark.parametrize("name", ["pdflatex-4-pages.pdf", "wang-answer-validation-5p.pdf"])
async def test_born_digital_page_matches_text_layer(engine_name: str, name: str, local_vlm_server) -> None:
    page = _page(name, 0)
    before = _requests_sent()
    async with _client(local_vlm_server) as client:
        result = await build_engine(engine_name, client, SETTINGS).extract(page)
    score = similarity(result.markdown, _text_layer(name, 0))
    print(f"{engine_name} {name} p1: similarity {score:.3f}, {result.requests} request(s)")
    assert score >= 0.90
    assert result.content_list and result.finish_reason == "stop"
    assert_mineru_compatible(result, 0)
    # Every request went through our guarded client (MinerU's own transport is never used).
    assert _requests_sent() - before == result.requests
    if engine_name == "mineru":
        assert result.requests >= 2  # layout detection, then at least one recognition
        assert all("bbox" in item for item in result.content_list)


async def test_mineru_figure_page_end_to_end(local_vlm_server) -> None:
    """zfn-chemistry-2p page 2 holds a figure. Today's local server answers text blocks only; once it
    answers ``image`` blocks (branch h/server) the same test checks the crop and its link."""
    page = _page("zfn-chemistry-2p.pdf", 1)
    async with _client(local_vlm_server) as client:
        result = await build_engine("mineru", client, SETTINGS).extract(page)
    assert_mineru_compatible(result, 1)
    assert similarity(result.markdown, _text_layer("zfn-chemistry-2p.pdf", 1)) >= 0.5
    figures = [item for item in result.content_list if item["type"] == "image"]
    print(
        f"zfn-chemistry-2p p2: {len(result.content_list)} items, {len(figures)} figure(s), {result.requests} requests"
    )
    for figure in figures:
        assert re.fullmatch(r"images/[0-9a-f]{64}\.jpg", figure["img_path"])
    if not figures:  # everything else above holds already; remove this once h/server is merged
        pytest.xfail("the local server does not answer image blocks yet (branch h/server)")


@pytest.mark.parametrize("engine_name", ENGINES)
async def test_scanned_page_returns_its_text(engine_name: str, local_vlm_server) -> None:
    page = _page("edgar-scanned.pdf", 0)  # no text layer
    async with _client(local_vlm_server) as client:
        result = await build_engine(engine_name, client, SETTINGS).extract(page)
    assert len(result.markdown.split()) > 50
    assert_mineru_compatible(result, 0)


@pytest.mark.parametrize("engine_name", ENGINES)
async def test_tiny_image_pages_neither_crash_nor_hang(engine_name: str, local_vlm_server) -> None:
    async with _client(local_vlm_server) as client:
        engine = build_engine(engine_name, client, SETTINGS)
        for index in range(6):
            result = await engine.extract(_page("scanned-images-6p.pdf", index))
            assert isinstance(result.markdown, str)
            assert_mineru_compatible(result, index)


@pytest.mark.parametrize("engine_name", ENGINES)
async def test_answer_cut_at_max_tokens_is_rejected_not_returned(engine_name: str, local_vlm_server) -> None:
    """Issue 9 row 11 through the real server: it stops at max_tokens with finish_reason "length"."""
    settings = MinerUConfig.model_validate({"answers": {"max_tokens": 16, "max_reasks": 1}})
    page = _page("minimal-document.pdf", 0)  # a sparse page: cheap to read twice
    before = _requests_sent()
    async with _client(local_vlm_server) as client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine(engine_name, client, settings).extract(page)
    assert caught.value.reason == "truncated"
    assert caught.value.requests == _requests_sent() - before
    assert caught.value.requests >= 2  # the first ask and one re-ask with 32 tokens, at least
