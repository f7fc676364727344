"""Validated answers (issue 10; issue 9 row 11; issue 21 rows 2, 3): a truncated, empty or looping answer, an
answer that did not finish with ``stop`` or one from another model is never a page result.

Both engines run on our real VLLMClient over a scripted transport (``scripted_vlm``), so what is
asked (max_tokens, how often) is what a server would see.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from mkg_pipeline.config import AnswersConfig, CircuitBreakerConfig, HTTPClientConfig, PipelineConfig, VLLMServerConfig
from mkg_pipeline.engines import REJECT_REASONS, AnswerRejected, PageInput, build_engine
from mkg_pipeline.engines.validation import answer_problem
from mkg_pipeline.vllm.breaker import CircuitBreaker
from mkg_pipeline.vllm.client import VLLMClient
from mkg_pipeline_tests.unit.scripted_vlm import MODEL, URL, ScriptedVLM, prompt_of

PNG = b"\x89PNG\r\n\x1a\n-not-decoded-by-page_markdown"
LOOP = "The patient was given the dose. " * 120
ONE_TEXT_BLOCK = "<|box_start|>100 100 900 200<|box_end|><|ref_start|>text<|ref_end|><|rotate_up|>"


def settings(max_tokens: int = 64, max_reasks: int = 1) -> PipelineConfig:
    return PipelineConfig(answers=AnswersConfig(max_tokens=max_tokens, max_reasks=max_reasks))


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


def test_rejection_reasons_are_known() -> None:
    with pytest.raises(ValueError, match="unknown rejection reason"):
        AnswerRejected("timeout", 1)
    rejected = AnswerRejected("empty", 2, "doc=x page=1: empty")
    assert (rejected.error_type, rejected.requests, str(rejected)) == ("empty", 2, "doc=x page=1: empty")


# ----------------------------------------------------------------------------- honest answers (issue 21 rows 2, 3)
#
# Only finish_reason "stop" from the configured model (or a configured alias) is a finished page;
# every other finish reason and every other model is a recorded failure with a stable reason.

FINISH_CASES = [
    ("length", "truncated"),
    ("content_filter", "finish_content_filter"),
    ("abort", "finish_abort"),
    ("tool_calls", "finish_tool_calls"),
    ("function_call", "finish_function_call"),
    ("error", "finish_error"),
    (None, "finish_missing"),
    ("", "finish_missing"),
    ("STOP", "finish_unknown"),  # finish reasons are compared exactly
    ("stop ", "finish_unknown"),
    ("eos_token", "finish_unknown"),
    ("x" * 500, "finish_unknown"),  # a server's invention never becomes a metric label
]


def honest_client(server: ScriptedVLM, aliases: tuple[str, ...] = ()) -> VLLMClient:
    """ScriptedVLM's client, with ``vllm.served_model_aliases``."""
    import httpx

    return VLLMClient(
        VLLMServerConfig(url=URL, model=MODEL, served_model_aliases=list(aliases)),
        HTTPClientConfig(max_attempts=1),
        transport=httpx.MockTransport(server._handle),
        breaker=CircuitBreaker(URL, CircuitBreakerConfig()),
    )


def answer_from(
    text: str, finish_reason: str | None = "stop", model: object = MODEL, *, omit_model: bool = False
) -> Any:
    """A chat completion answered by ``model`` (absent with ``omit_model``)."""
    import httpx

    body: dict[str, Any] = {
        "id": "chatcmpl-honest",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
    }
    if not omit_model:
        body["model"] = model
    return httpx.Response(200, json=body)


@pytest.mark.parametrize(("finish_reason", "reason"), FINISH_CASES)
def test_every_finish_reason_but_stop_is_a_problem_with_a_stable_reason(finish_reason: str | None, reason: str) -> None:
    problem = answer_problem("A whole page.", finish_reason, model=MODEL, accepted_models={MODEL}, require_text=True)
    assert problem is not None and problem[0] == reason
    assert reason in REJECT_REASONS
    if finish_reason is not None and len(finish_reason) < 100:
        assert repr(finish_reason) in problem[1]  # the detail names what the server said
    assert answer_problem("A whole page.", "stop", model=MODEL, accepted_models={MODEL}, require_text=True) is None


@pytest.mark.parametrize(
    "model",
    [
        "other/model",
        MODEL.upper(),  # exact match: served names are case-sensitive in vLLM
        f" {MODEL}",
        f"{MODEL}\n",
        "",
        None,  # the answer names no model
        7,
    ],
)
def test_an_answer_from_another_model_is_a_mismatch(model: object) -> None:
    answered = model if isinstance(model, str) or model is None else str(model)
    problem = answer_problem("A whole page.", "stop", model=answered, accepted_models={MODEL}, require_text=True)
    assert problem is not None and problem[0] == "model_mismatch"
    assert MODEL in problem[1]  # the detail names the configured model


def test_model_mismatch_is_judged_before_the_finish_reason() -> None:
    problem = answer_problem("cut", "length", model="other/model", accepted_models={MODEL}, require_text=True)
    assert problem is not None and problem[0] == "model_mismatch"


@pytest.mark.parametrize(("finish_reason", "reason"), [c for c in FINISH_CASES if c[0] != "length"][:7])
async def test_page_markdown_odd_finish_reason_is_reasked_then_rejected(finish_reason: str | None, reason: str) -> None:
    server = ScriptedVLM(lambda body: answer_from("A page, maybe cut", finish_reason))
    async with server.client() as client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine("page_markdown", client, settings(max_tokens=64, max_reasks=1)).extract(page())
    assert (caught.value.reason, caught.value.requests) == (reason, 2)
    assert [b["max_tokens"] for b in server.bodies] == [64, 64]  # only a truncation raises the budget
    assert "doc=d0 page=1" in str(caught.value)


async def test_page_markdown_content_filter_on_a_scanned_page_is_not_a_blank_page() -> None:
    """The issue's case: an empty answer, finish_reason content_filter, on a page without a text layer."""
    server = ScriptedVLM(lambda body: answer_from("", "content_filter"))
    async with server.client() as client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine("page_markdown", client, settings(max_reasks=0)).extract(page(text_layer_chars=0))
    assert caught.value.reason == "finish_content_filter"


async def test_page_markdown_abort_then_stop_is_a_result() -> None:
    answers = iter([answer_from("# Title\n\nCut", "abort"), answer_from("# Title\n\nThe whole page.")])
    server = ScriptedVLM(lambda body: next(answers))
    async with server.client() as client:
        result = await build_engine("page_markdown", client, settings()).extract(page())
    assert (result.markdown, result.finish_reason, result.requests) == ("# Title\n\nThe whole page.", "stop", 2)
    assert result.model == MODEL


@pytest.mark.parametrize(
    "answer",
    [
        answer_from("A whole page.", model="other/model"),
        answer_from("A whole page.", model=MODEL.upper()),
        answer_from("A whole page.", model=f"{MODEL} "),
        answer_from("A whole page.", omit_model=True),
        answer_from("A whole page.", model=None),
        answer_from("A whole page.", model=["list"]),
    ],
)
async def test_page_markdown_answer_from_another_model_is_rejected(answer: Any) -> None:
    server = ScriptedVLM(lambda body: answer)
    async with server.client() as client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine("page_markdown", client, settings(max_reasks=1)).extract(page())
    assert (caught.value.reason, caught.value.requests) == ("model_mismatch", 2)
    assert MODEL in str(caught.value) and "doc=d0 page=1" in str(caught.value)


async def test_page_markdown_answer_from_a_configured_alias_is_recorded_under_that_name() -> None:
    server = ScriptedVLM(lambda body: answer_from("A whole page.", model="qwen-served"))
    async with honest_client(server, aliases=("qwen-served",)) as client:
        engine = build_engine("page_markdown", client, settings())
        result = await engine.extract(page())
    assert (result.markdown, result.model, result.requests) == ("A whole page.", "qwen-served", 1)
    assert server.bodies[0]["model"] == MODEL  # the request still names the configured model
    assert MODEL in engine.identity  # and the cache key is still the configured model's


async def test_an_alias_does_not_accept_every_model() -> None:
    server = ScriptedVLM(lambda body: answer_from("A whole page.", model="third/model"))
    async with honest_client(server, aliases=("qwen-served",)) as client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine("page_markdown", client, settings(max_reasks=0)).extract(page())
    assert caught.value.reason == "model_mismatch" and "qwen-served" in str(caught.value)


def two_choices(first: tuple[str, str], second: tuple[str, str]) -> Any:
    import httpx

    choices = [
        {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        for i, (text, finish) in enumerate((first, second))
    ]
    return httpx.Response(200, json={"id": "c", "object": "chat.completion", "model": MODEL, "choices": choices})


async def test_a_finish_reason_that_differs_per_choice_is_judged_on_the_choice_used() -> None:
    """The page is made of choices[0] (n is never asked for): its finish_reason decides, whatever the others say."""
    server = ScriptedVLM(lambda body: two_choices(("The page.", "stop"), ("Cut", "length")))
    async with server.client() as client:
        result = await build_engine("page_markdown", client, settings(max_reasks=0)).extract(page())
    assert (result.markdown, result.finish_reason) == ("The page.", "stop")

    server = ScriptedVLM(lambda body: two_choices(("Cut", "length"), ("The page.", "stop")))
    async with server.client() as client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine("page_markdown", client, settings(max_reasks=0)).extract(page())
    assert caught.value.reason == "truncated"


@pytest.mark.parametrize(("finish_reason", "reason"), [("abort", "finish_abort"), (None, "finish_missing")])
async def test_mineru_block_with_an_odd_finish_reason_rejects_the_page(finish_reason: str | None, reason: str) -> None:
    server = ScriptedVLM(
        lambda body: answer_from(ONE_TEXT_BLOCK) if "Layout" in prompt_of(body) else answer_from("Cut", finish_reason)
    )
    async with server.client() as client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine("mineru", client, settings(max_reasks=1)).extract(page(png=white_png()))
    assert (caught.value.reason, caught.value.requests) == (reason, 3)  # layout + 2 asks of the block
    assert "doc=d0 page=1 step=text_recognition" in str(caught.value)


async def test_mineru_layout_with_content_filter_rejects_the_page() -> None:
    server = ScriptedVLM(lambda body: answer_from("", "content_filter"))
    async with server.client() as client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine("mineru", client, settings(max_reasks=1)).extract(
                page(text_layer_chars=0, png=white_png())
            )
    assert (caught.value.reason, caught.value.requests) == ("finish_content_filter", 2)


@pytest.mark.parametrize("step", ["Layout", "Recognition"])
async def test_mineru_any_request_answered_by_another_model_rejects_the_page(step: str) -> None:
    def answer(body: dict) -> Any:
        prompt = prompt_of(body)
        model = "other/model" if step in prompt else MODEL
        return answer_from(ONE_TEXT_BLOCK if "Layout" in prompt else "The paragraph.", model=model)

    server = ScriptedVLM(answer)
    async with server.client() as client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine("mineru", client, settings(max_reasks=0)).extract(page(png=white_png()))
    assert caught.value.reason == "model_mismatch" and "other/model" in str(caught.value)


async def test_mineru_answers_from_an_alias_are_recorded_under_that_name() -> None:
    server = ScriptedVLM(
        lambda body: answer_from(ONE_TEXT_BLOCK if "Layout" in prompt_of(body) else "The paragraph.", model="mineru")
    )
    async with honest_client(server, aliases=("mineru",)) as client:
        result = await build_engine("mineru", client, settings()).extract(page(png=white_png()))
    assert (result.model, result.finish_reason, result.requests) == ("mineru", "stop", 2)
    assert result.content_list[0]["text"] == "The paragraph."
