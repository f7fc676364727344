"""The olmocr engine against the real local VLM server (issue 19 item 6): the server answers
olmOCR-2's prompt in olmOCR-2's format, finds a page's rotation itself, and the engine turns the
page upright and asks again, every request through our guarded client.

Pages are cheap (``lorem_png``: two lines; ``minimal-document.pdf``): this is the protocol, not the OCR.
"""

from __future__ import annotations

import io

import httpx
import jsonschema
import pytest

from mkg_pipeline.config import PipelineConfig, VLLMServerConfig
from mkg_pipeline.engines import AnswerRejected, PageInput, build_engine
from mkg_pipeline.engines.olmocr import OlmOcrEngine, parse_answer
from mkg_pipeline.engines.page_safety import CONTENT_LIST_SCHEMA
from mkg_pipeline.engines.prompts import OLMOCR_PROMPT
from mkg_pipeline.vllm.client import VLLMClient
from mkg_pipeline_tests.fixtures.local_server import image_data_url, lorem_png, render_corpus_page

pytestmark = pytest.mark.integration

SETTINGS = PipelineConfig.model_validate({"engine": "olmocr", "answers": {"max_reasks": 2}})


def _client(server) -> VLLMClient:
    return VLLMClient(VLLMServerConfig(url=server.url, model=server.model, api_key=server.api_key))


def _turned(png: bytes, degrees: int) -> bytes:
    from PIL import Image

    turn = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
    with Image.open(io.BytesIO(png)) as opened:
        buffer = io.BytesIO()
        opened.transpose(turn[degrees]).save(buffer, "PNG")
        return buffer.getvalue()


def _pixels(png: bytes) -> tuple[tuple[int, int], bytes]:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as opened:
        return opened.size, opened.convert("RGB").tobytes()


def _olmocr_body(server, png: bytes) -> dict:
    """olmOCR's own request (olmocr/pipeline.py build_page_query): prompt first, then the image."""
    content = [
        {"type": "text", "text": OLMOCR_PROMPT},
        {"type": "image_url", "image_url": {"url": image_data_url(png)}},
    ]
    return {
        "model": server.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8000,
        "temperature": 0.1,
    }


@pytest.mark.parametrize(("turned_by", "correction"), [(0, 0), (90, 270), (180, 180), (270, 90)])
def test_the_server_answers_olmocrs_prompt_in_its_format_with_the_rotation(
    local_vlm_server, turned_by: int, correction: int
) -> None:
    png = lorem_png() if turned_by == 0 else _turned(lorem_png(), turned_by)
    response = httpx.post(
        f"{local_vlm_server.base_url}/chat/completions",
        json=_olmocr_body(local_vlm_server, png),
        headers=local_vlm_server.headers,
        timeout=120,
    )
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    front, text = parse_answer(choice["message"]["content"])
    assert (front.is_rotation_valid, front.rotation_correction) == (correction == 0, correction)
    assert front.primary_language == "en" and not front.is_table and not front.is_diagram
    # Like olmOCR-2, the text of a turned page is still the upright text.
    assert "Lorem ipsum dolor sit amet" in text and "consectetur adipiscing elit" in text


@pytest.mark.parametrize("turned_by", [90, 180, 270])
async def test_the_engine_turns_a_rotated_page_upright_and_asks_again(local_vlm_server, turned_by: int) -> None:
    upright = lorem_png()
    page = PageInput(png=_turned(upright, turned_by), page_idx=0, text_layer_chars=56, label="test lorem page=1")
    sent: list[bytes] = []
    async with _client(local_vlm_server) as client:
        engine = build_engine("olmocr", client, SETTINGS)
        assert isinstance(engine, OlmOcrEngine)
        real_body = engine.request_body

        def spy(png: bytes, temperature: float) -> dict:
            sent.append(png)
            return real_body(png, temperature)

        engine.request_body = spy  # type: ignore[method-assign]
        result = await engine.extract(page)
    assert result.requests == 2 == len(sent)
    assert _pixels(sent[1]) == _pixels(upright)  # the second ask saw the page upright
    assert result.markdown == "Lorem ipsum dolor sit amet,\n\nconsectetur adipiscing elit."
    front, _ = parse_answer(result.raw_answer)
    assert front.is_rotation_valid and front.rotation_correction == 0
    jsonschema.validate(result.content_list, CONTENT_LIST_SCHEMA)


async def test_a_corpus_page_end_to_end(local_vlm_server) -> None:
    page = PageInput(
        png=render_corpus_page("minimal-document.pdf", 0), page_idx=0, text_layer_chars=100, label="test minimal page=1"
    )
    async with _client(local_vlm_server) as client:
        result = await build_engine("olmocr", client, SETTINGS).extract(page)
    assert result.requests == 1 and result.finish_reason == "stop" and result.model == local_vlm_server.model
    assert result.markdown.strip() and "primary_language" not in result.markdown
    jsonschema.validate(result.content_list, CONTENT_LIST_SCHEMA)


async def test_cut_off_and_formatless_answers_are_reasked_then_rejected(start_local_vlm_server) -> None:
    """Through the real server: max_tokens too small gives "length"; its empty-answer fault gives an
    answer without front matter."""
    server = start_local_vlm_server(empty_rate=1.0)
    page = PageInput(png=lorem_png(), page_idx=0, text_layer_chars=56, label="test lorem page=1")
    async with _client(server) as client:
        with pytest.raises(AnswerRejected) as formatless:
            await build_engine("olmocr", client, SETTINGS).extract(page)
        server.set_faults(empty_rate=0.0)
        tiny = PipelineConfig.model_validate({"engine": "olmocr", "answers": {"max_tokens": 16, "max_reasks": 1}})
        with pytest.raises(AnswerRejected) as cut:
            await build_engine("olmocr", client, tiny).extract(page)
        result = await build_engine("olmocr", client, SETTINGS).extract(page)
    assert (formatless.value.reason, formatless.value.requests) == ("front_matter", 3)
    assert (cut.value.reason, cut.value.requests) == ("truncated", 2)
    assert "Lorem ipsum" in result.markdown and result.requests == 1


async def test_a_figure_the_server_labels_is_cropped_by_the_engine(local_vlm_server) -> None:
    """zfn-chemistry-2p page 2 holds a figure: labelled in olmOCR's pixels, cropped, linked, listed."""
    page = PageInput(
        png=render_corpus_page("zfn-chemistry-2p.pdf", 1), page_idx=1, text_layer_chars=100, label="test zfn page=2"
    )
    async with _client(local_vlm_server) as client:
        result = await build_engine("olmocr", client, SETTINGS).extract(page)
    jsonschema.validate(result.content_list, CONTENT_LIST_SCHEMA)
    figures = [item for item in result.content_list if item["type"] == "image"]
    assert figures and {item["img_path"] for item in figures} == set(result.images)
    assert all(f"]({item['img_path']})" in result.markdown for item in figures)
    assert "](page_" not in result.markdown
