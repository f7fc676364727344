"""Issue 19 item 4: every invalid answer is re-asked along olmOCR's temperature schedule (one table,
``engines.schedule``, shared by all three engines), bounded by ``answers.max_reasks``.

Run on our real VLLMClient over a scripted transport: the temperatures asserted are the ones in the
request bodies a server would get.
"""

from __future__ import annotations

import pytest

from mkg_pipeline.config import AnswersConfig, PipelineConfig
from mkg_pipeline.engines import AnswerRejected, PageInput, build_engine, olmocr
from mkg_pipeline.engines.schedule import OLMOCR_TEMPERATURES, reask_temperature, temperature_for
from mkg_pipeline_tests.unit.scripted_vlm import ScriptedVLM, prompt_of
from mkg_pipeline_tests.unit.test_engine_answers import LOOP, ONE_TEXT_BLOCK, PNG, white_png

INVALID = [
    (("cut off", "length"), "truncated"),
    (("stopped", "abort"), "finish_abort"),
    (("no finish", None), "finish_missing"),
    (("", "stop"), "empty"),
    ((LOOP, "stop"), "repetition"),
]


def settings(max_reasks: int) -> PipelineConfig:
    return PipelineConfig(answers=AnswersConfig(max_tokens=64, max_reasks=max_reasks))


def page(png: bytes = PNG) -> PageInput:
    return PageInput(png=png, page_idx=0, text_layer_chars=100, label="doc=d0 page=1")


def test_the_schedule_is_olmocr_s_and_the_olmocr_engine_uses_the_same_table() -> None:
    assert OLMOCR_TEMPERATURES == (0.1, 0.1, 0.2, 0.3, 0.5, 0.8, 0.9, 1.0)
    assert olmocr.temperature_for is temperature_for  # one schedule, not a copy
    assert [temperature_for(n) for n in (0, 7, 8, 50)] == [0.1, 1.0, 1.0, 1.0]
    assert [reask_temperature(ask, 0.0) for ask in range(1, 5)] == [0.0, 0.1, 0.2, 0.3]


@pytest.mark.parametrize(("answer", "reason"), INVALID)
async def test_page_markdown_reasks_every_invalid_answer_up_the_schedule(
    answer: tuple[str, str | None], reason: str
) -> None:
    server = ScriptedVLM(lambda body: answer)
    async with server.client() as client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine("page_markdown", client, settings(max_reasks=4)).extract(page())
    assert caught.value.reason == reason and caught.value.requests == 5 == len(server.bodies)
    assert [body["temperature"] for body in server.bodies] == [0.0, 0.1, 0.2, 0.3, 0.5]


async def test_page_markdown_valid_first_answer_is_greedy_and_alone() -> None:
    server = ScriptedVLM(lambda body: "# A page")
    async with server.client() as client:
        result = await build_engine("page_markdown", client, settings(max_reasks=4)).extract(page())
    assert result.requests == 1 and [body["temperature"] for body in server.bodies] == [0.0]


@pytest.mark.parametrize(("answer", "reason"), [case for case in INVALID if case[1] != "empty"])
async def test_mineru_reasks_an_invalid_block_up_the_schedule(answer: tuple[str, str | None], reason: str) -> None:
    server = ScriptedVLM(lambda body: (ONE_TEXT_BLOCK, "stop") if "Layout" in prompt_of(body) else answer)
    async with server.client() as client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine("mineru", client, settings(max_reasks=3)).extract(page(png=white_png()))
    assert caught.value.reason == reason
    _layout, *block = server.bodies
    first = block[0]["temperature"]  # MinerU's own sampling parameters for the step
    assert [body["temperature"] for body in block] == [first, 0.1, 0.2, 0.3]


async def test_mineru_page_asked_again_for_no_content_climbs_the_schedule() -> None:
    server = ScriptedVLM(lambda body: "")  # no layout block at all: the page is "empty"
    async with server.client() as client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine("mineru", client, settings(max_reasks=2)).extract(page(png=white_png()))
    assert caught.value.reason == "empty" and len(server.bodies) == 3
    first = server.bodies[0]["temperature"]
    assert [body["temperature"] for body in server.bodies] == [first, 0.1, 0.2]


@pytest.mark.parametrize("name", ["page_markdown", "mineru", "olmocr"])
async def test_each_engine_carries_its_answer_policy_for_the_stage(name: str) -> None:
    """The vlm stage takes the fallback settings from the engine built from the same configuration."""
    answers = AnswersConfig(text_fallback=True, max_fallback_share=0.25)
    server = ScriptedVLM(lambda body: "")
    async with server.client() as client:
        engine = build_engine(name, client, PipelineConfig(answers=answers))
    assert engine.answers == answers  # type: ignore[attr-defined]
