"""Validated answers (issue 10; issue 9 row 11): a truncated, empty or looping answer is never a page result.

Both engines run on our real VLLMClient over a scripted transport (``scripted_vlm``), so what is
asked (max_tokens, how often) is what a server would see.
"""

from __future__ import annotations

import io
import json

import pytest

from mkg_pipeline.config import AnswersConfig, MinerUConfig
from mkg_pipeline.engines import AnswerRejected, PageInput, build_engine
from mkg_pipeline_tests.unit.scripted_vlm import ScriptedVLM, prompt_of

PNG = b"\x89PNG\r\n\x1a\n-not-decoded-by-page_markdown"
LOOP = "The patient was given the dose. " * 120
ONE_TEXT_BLOCK = "<|box_start|>100 100 900 200<|box_end|><|ref_start|>text<|ref_end|><|rotate_up|>"


def settings(max_tokens: int = 64, max_reasks: int = 1) -> MinerUConfig:
    return MinerUConfig(answers=AnswersConfig(max_tokens=max_tokens, max_reasks=max_reasks))


def page(text_layer_chars: int = 100, png: bytes = PNG) -> PageInput:
    return PageInput(png=png, page_idx=0, text_layer_chars=text_layer_chars, label="doc=d0 page=1")


def white_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (600, 800), "white").save(buffer, "PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- page_markdown


async def test_page_markdown_truncated_answer_is_rejected_after_reasks_with_doubled_max_tokens() -> None:
    server = ScriptedVLM(lambda body: ("A page cut off in the mid", "length"))
    async with server.client() as client:
        engine = build_engine("page_markdown", client, settings(max_tokens=64, max_reasks=2))
        with pytest.raises(AnswerRejected) as caught:
            await engine.extract(page())
    assert caught.value.reason == "truncated"
    assert caught.value.requests == 3 == len(server.bodies)
    assert [body["max_tokens"] for body in server.bodies] == [64, 128, 256]
    assert "doc=d0 page=1" in str(caught.value)


async def test_page_markdown_reask_that_succeeds_is_a_result_costing_both_requests() -> None:
    answers = iter([("# Title\n\nCut off in the mid", "length"), ("# Title\n\nThe whole page.", "stop")])
    server = ScriptedVLM(lambda body: next(answers))
    async with server.client() as client:
        result = await build_engine("page_markdown", client, settings(max_tokens=64)).extract(page())
    assert result.requests == 2 and [b["max_tokens"] for b in server.bodies] == [64, 128]
    assert result.markdown == "# Title\n\nThe whole page." and result.finish_reason == "stop"


@pytest.mark.parametrize("answer", ["", "  \n\n ", "```markdown\n\n```"])
async def test_page_markdown_empty_answer_on_a_page_with_text_is_rejected(answer: str) -> None:
    server = ScriptedVLM(lambda body: answer)
    async with server.client() as client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine("page_markdown", client, settings(max_reasks=1)).extract(page(text_layer_chars=100))
    assert (caught.value.reason, caught.value.requests) == ("empty", 2)
    assert [b["max_tokens"] for b in server.bodies] == [64, 64]  # only truncation raises the budget


async def test_page_markdown_empty_answer_on_a_page_without_text_is_a_blank_page() -> None:
    server = ScriptedVLM(lambda body: "")
    async with server.client() as client:
        result = await build_engine("page_markdown", client, settings()).extract(page(text_layer_chars=0))
    assert (result.markdown, result.content_list, result.requests) == ("", [], 1)


async def test_page_markdown_repetition_loop_is_rejected_even_when_it_stopped() -> None:
    server = ScriptedVLM(lambda body: ("# Results\n\n" + LOOP, "stop"))
    async with server.client() as client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine("page_markdown", client, settings(max_reasks=0)).extract(page())
    assert (caught.value.reason, caught.value.requests) == ("repetition", 1)
    assert "repeats of" in str(caught.value)


async def test_page_markdown_lone_surrogate_never_reaches_what_is_stored() -> None:
    server = ScriptedVLM(lambda body: "# T\ud800itle\n\nText \udfff here")
    async with server.client() as client:
        result = await build_engine("page_markdown", client, settings()).extract(page())
    for value in (result.markdown, result.raw_answer, json.dumps(result.content_list, ensure_ascii=False)):
        value.encode("utf-8")
    assert result.content_list[0] == {"type": "text", "text": "T\ufffditle", "text_level": 1, "page_idx": 0}


# ----------------------------------------------------------------------------- mineru


async def test_mineru_truncated_block_is_reasked_with_doubled_max_tokens_then_accepted() -> None:
    asked: list[str] = []

    def answer(body: dict) -> tuple[str, str]:
        prompt = prompt_of(body)
        asked.append(prompt)
        if "Layout Detection" in prompt:
            return ONE_TEXT_BLOCK, "stop"
        return ("cut off", "length") if asked.count(prompt) == 1 else ("The whole paragraph.", "stop")

    server = ScriptedVLM(answer)
    async with server.client() as client:
        result = await build_engine("mineru", client, settings(max_tokens=64)).extract(page(png=white_png()))
    assert result.requests == 3 == len(server.bodies)  # layout + the block asked twice
    assert [b["max_tokens"] for b in server.bodies] == [64, 64, 128]
    assert result.content_list[0]["text"] == "The whole paragraph."
    assert [a["answer"] for a in json.loads(result.raw_answer)] == [ONE_TEXT_BLOCK, "The whole paragraph."]


@pytest.mark.parametrize(
    ("recognition", "reason"),
    [(("never finishes", "length"), "truncated"), ((LOOP, "stop"), "repetition")],
)
async def test_mineru_block_that_stays_bad_rejects_the_page(recognition: tuple[str, str], reason: str) -> None:
    server = ScriptedVLM(lambda body: (ONE_TEXT_BLOCK, "stop") if "Layout" in prompt_of(body) else recognition)
    async with server.client() as client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine("mineru", client, settings(max_reasks=1)).extract(page(png=white_png()))
    assert caught.value.reason == reason
    assert caught.value.requests == 3 == len(server.bodies)  # layout + 2 asks of the block
    assert "doc=d0 page=1 step=text_recognition" in str(caught.value)


async def test_mineru_truncated_layout_rejects_the_page() -> None:
    server = ScriptedVLM(lambda body: (ONE_TEXT_BLOCK[:40], "length"))
    async with server.client() as client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine("mineru", client, settings(max_reasks=2)).extract(page(png=white_png()))
    assert (caught.value.reason, caught.value.requests) == ("truncated", 3)


async def test_mineru_page_without_content_is_empty_when_the_text_layer_has_text() -> None:
    server = ScriptedVLM(lambda body: "")
    async with server.client() as client:
        engine = build_engine("mineru", client, settings(max_reasks=1))
        with pytest.raises(AnswerRejected) as caught:
            await engine.extract(page(text_layer_chars=250, png=white_png()))
        assert (caught.value.reason, caught.value.requests) == ("empty", 2)  # the page asked twice
        blank = await engine.extract(page(text_layer_chars=0, png=white_png()))
    assert (blank.content_list, blank.markdown, blank.requests) == ([], "", 1)


async def test_no_reasks_configured_means_one_request() -> None:
    server = ScriptedVLM(lambda body: ("cut", "length"))
    async with server.client() as client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine("page_markdown", client, settings(max_reasks=0)).extract(page())
    assert caught.value.requests == 1 == len(server.bodies)


def test_rejection_reasons_are_the_documented_three() -> None:
    with pytest.raises(ValueError, match="unknown rejection reason"):
        AnswerRejected("timeout", 1)
    rejected = AnswerRejected("empty", 2, "doc=x page=1: empty")
    assert (rejected.error_type, rejected.requests, str(rejected)) == ("empty", 2, "doc=x page=1: empty")
