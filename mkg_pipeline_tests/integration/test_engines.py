"""Both engines against the real local VLM server: every request goes through our guarded client, and
what they return is MinerU-compatible (a valid content list, figures that exist and are linked).

OCR quality is asserted once per engine route, elsewhere: the page-to-Markdown route in
test_local_server.py (similarity and reading order), MinerU's layout + recognition route in
test_mineru_reference_client.py (MinerU's own client, figures and tables). Here, cheap pages only,
and one figure page for the MinerU engine's crops.
"""

from __future__ import annotations

import io
import re

import jsonschema
import pymupdf
import pytest

from mkg_pipeline.config import PipelineConfig, VLLMServerConfig
from mkg_pipeline.engines import AnswerRejected, PageInput, PageResult, build_engine
from mkg_pipeline.engines.page_safety import CONTENT_LIST_SCHEMA
from mkg_pipeline.metrics.client import REGISTRY
from mkg_pipeline.vllm.client import VLLMClient
from mkg_pipeline_tests.fixtures.corpus import corpus_pdf
from mkg_pipeline_tests.fixtures.local_server import render_corpus_page

pytestmark = pytest.mark.integration

ENGINES = ["page_markdown", "mineru"]
SETTINGS = PipelineConfig()


def _client(server) -> VLLMClient:
    return VLLMClient(VLLMServerConfig(url=server.url, model=server.model, api_key=server.api_key))


def _text_layer(name: str, index: int) -> str:
    with pymupdf.open(corpus_pdf(name)) as doc:
        return doc[index].get_text()


def _page(name: str, index: int, dpi: int = 150) -> PageInput:
    return PageInput(
        png=render_corpus_page(name, index, dpi=dpi),
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
async def test_every_request_goes_through_the_guarded_client(engine_name: str, local_vlm_server) -> None:
    page = _page("minimal-document.pdf", 0, dpi=100)
    before = _requests_sent()
    async with _client(local_vlm_server) as client:
        result = await build_engine(engine_name, client, SETTINGS).extract(page)
    assert "Lorem ipsum" in result.markdown
    assert result.content_list and result.finish_reason == "stop"
    assert_mineru_compatible(result, 0)
    # Every request went through our guarded client (MinerU's own transport is never used).
    assert _requests_sent() - before == result.requests
    if engine_name == "mineru":
        assert result.requests >= 2  # layout detection, then at least one recognition
        assert all("bbox" in item for item in result.content_list)


async def test_mineru_figure_page_end_to_end(local_vlm_server) -> None:
    """zfn-chemistry-2p page 2 holds a figure: cropped, content-addressed, linked from the Markdown."""
    page = _page("zfn-chemistry-2p.pdf", 1)
    async with _client(local_vlm_server) as client:
        result = await build_engine("mineru", client, SETTINGS).extract(page)
    assert_mineru_compatible(result, 1)
    figures = [item for item in result.content_list if item["type"] == "image"]
    assert figures, [item["type"] for item in result.content_list]
    for figure in figures:
        assert re.fullmatch(r"images/[0-9a-f]{64}\.jpg", figure["img_path"])


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
    settings = PipelineConfig.model_validate({"answers": {"max_tokens": 16, "max_reasks": 1}})
    page = _page("minimal-document.pdf", 0)  # a sparse page: cheap to read twice
    before = _requests_sent()
    async with _client(local_vlm_server) as client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine(engine_name, client, settings).extract(page)
    assert caught.value.reason == "truncated"
    assert caught.value.requests == _requests_sent() - before
    assert caught.value.requests >= 2  # the first ask and one re-ask with 32 tokens, at least
