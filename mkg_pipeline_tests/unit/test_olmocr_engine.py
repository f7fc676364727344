"""The olmocr engine (issue 19 item 6) against a scripted server replaying olmOCR-2-style answers.

The engine runs on our real VLLMClient over a scripted transport (``scripted_vlm``): what it asks
(prompt, message order, image, temperature, max_tokens, how often) is what vLLM would see.
"""

from __future__ import annotations

import io
from typing import Any

import pytest

from mkg_pipeline.config import AnswersConfig, PipelineConfig
from mkg_pipeline.engines import AnswerRejected, PageInput, build_engine
from mkg_pipeline.engines.olmocr import (
    OLMOCR_LONGEST_SIDE,
    OLMOCR_TEMPERATURES,
    FrontMatter,
    FrontMatterError,
    OlmOcrEngine,
    PageImageError,
    parse_answer,
)
from mkg_pipeline.engines.page_safety import CONTENT_LIST_SCHEMA
from mkg_pipeline.engines.prompts import OLMOCR_PROMPT
from mkg_pipeline_tests.unit.scripted_vlm import (
    MODEL,
    ScriptedVLM,
    correction_for,
    image_of,
    marked_page_png,
    olmocr_answer,
)

UPRIGHT_TEXT = "# Upright title\n\nThe page as it reads."


def settings(max_tokens: int = 512, max_reasks: int = 1, prompt_version: str = "v1") -> PipelineConfig:
    return PipelineConfig(
        engine="olmocr",
        prompt_version=prompt_version,
        answers=AnswersConfig(max_tokens=max_tokens, max_reasks=max_reasks),
    )


def page(png: bytes, text_layer_chars: int = 100) -> PageInput:
    return PageInput(png=png, page_idx=3, text_layer_chars=text_layer_chars, label="doc=d0 page=4")


def rotated(png: bytes, degrees: int) -> bytes:
    from PIL import Image

    turn = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}[degrees]
    with Image.open(io.BytesIO(png)) as opened:
        buffer = io.BytesIO()
        opened.transpose(turn).save(buffer, "PNG")
    return buffer.getvalue()


def pixels(png: bytes) -> tuple[tuple[int, int], bytes]:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as opened:
        rgb = opened.convert("RGB")
        return rgb.size, rgb.tobytes()


def validate_content_list(items: list[dict[str, Any]]) -> None:
    import jsonschema

    jsonschema.validate(items, CONTENT_LIST_SCHEMA)


def olmocr_2(body: dict[str, Any]) -> str:
    """olmOCR-2 as trained: the upright page's text, and for a page on its side the turn it needs."""
    correction = correction_for(image_of(body))
    if correction:
        return olmocr_answer("Sideways text the model half read", rotation_valid=False, rotation_correction=correction)
    return olmocr_answer(UPRIGHT_TEXT)


# ----------------------------------------------------------------------------- the request and the answer


async def test_asks_with_olmocrs_prompt_first_then_the_image_and_returns_the_page_text() -> None:
    answer = olmocr_answer(
        "# Results\n\nThe dose was $x^2$.\n\n<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>",
        is_table=True,
    )
    server = ScriptedVLM(lambda body: answer)
    png = marked_page_png()
    async with server.client() as client:
        engine = build_engine("olmocr", client, settings())
        result = await engine.extract(page(png))
    (body,) = server.bodies
    content = body["messages"][0]["content"]
    assert [message["role"] for message in body["messages"]] == ["user"]  # no system prompt, as olmOCR
    assert [part["type"] for part in content] == ["text", "image_url"]
    assert content[0]["text"] == OLMOCR_PROMPT
    assert image_of(body) == png  # small enough: sent as rendered
    assert body["temperature"] == OLMOCR_TEMPERATURES[0] == 0.1
    assert body["max_tokens"] == 512 and body["model"] == MODEL
    assert result.requests == 1 and result.finish_reason == "stop" and result.model == MODEL
    assert result.raw_answer == answer
    assert result.markdown.startswith("# Results\n\nThe dose was $x^2$.")
    assert "primary_language" not in result.markdown
    types = [item["type"] for item in result.content_list]
    assert types == ["text", "text", "table"]
    assert result.content_list[0] == {"type": "text", "text": "Results", "text_level": 1, "page_idx": 3}
    assert "<td>1</td>" in result.content_list[2]["table_body"]
    validate_content_list(result.content_list)


async def test_a_figure_label_is_cropped_from_the_image_the_model_saw() -> None:
    # The mark is the top-left 30x30 px of a 120x160 page: the model labels it in pixels.
    answer = olmocr_answer("Before. ![A black square](page_0_0_30_30.png) After.")
    server = ScriptedVLM(lambda body: answer)
    async with server.client() as client:
        result = await build_engine("olmocr", client, settings()).extract(page(marked_page_png()))
    (name,) = result.images
    assert name.startswith("images/") and f"![A black square]({name})" in result.markdown
    assert [item["type"] for item in result.content_list] == ["text", "image", "text"]  # a block of its own
    image = result.content_list[1]
    assert image["img_path"] == name and image["bbox"] == [0, 0, 250, 188]
    from PIL import Image

    with Image.open(io.BytesIO(result.images[name])) as crop:
        assert crop.size == (30, 30) and crop.convert("L").getpixel((15, 15)) < 64
    validate_content_list(result.content_list)


async def test_a_page_larger_than_olmocrs_image_size_is_sent_at_1288_px_on_its_longest_side() -> None:
    server = ScriptedVLM(lambda body: olmocr_answer(UPRIGHT_TEXT))
    big = marked_page_png(1275, 1650)  # a letter page at 150 DPI
    async with server.client() as client:
        await build_engine("olmocr", client, settings()).extract(page(big))
    (size, _) = pixels(image_of(server.bodies[0]))
    assert max(size) == OLMOCR_LONGEST_SIDE == 1288 and size == (995, 1288)


async def test_identity_changes_with_the_engine_its_prompt_and_the_prompt_version() -> None:
    server = ScriptedVLM(lambda body: "")
    async with server.client() as client:
        olmocr = build_engine("olmocr", client, settings())
        bumped = build_engine("olmocr", client, settings(prompt_version="v2"))
        page_markdown = build_engine("page_markdown", client, settings())
    assert olmocr.identity.startswith(f"olmocr|{MODEL}|v1+olmocr-")
    assert len({olmocr.identity, bumped.identity, page_markdown.identity}) == 3


async def test_an_undecodable_page_image_is_a_specific_error_before_any_request() -> None:
    server = ScriptedVLM(lambda body: olmocr_answer(UPRIGHT_TEXT))
    async with server.client() as client:
        with pytest.raises(PageImageError, match="doc=d0 page=4"):
            await build_engine("olmocr", client, settings()).extract(page(b"\x89PNG\r\n\x1a\nnot really"))
    assert server.bodies == []


# ----------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("turned_by", [90, 180, 270])
async def test_a_rotated_page_is_turned_as_the_model_says_and_asked_again(turned_by: int) -> None:
    upright = marked_page_png()
    server = ScriptedVLM(olmocr_2)
    async with server.client() as client:
        result = await build_engine("olmocr", client, settings(max_reasks=1)).extract(page(rotated(upright, turned_by)))
    assert len(server.bodies) == result.requests == 2
    first, second = (image_of(body) for body in server.bodies)
    assert correction_for(first) == (360 - turned_by) % 360  # the model saw the page on its side...
    assert pixels(second) == pixels(upright)  # ...and then the page turned upright
    assert [body["temperature"] for body in server.bodies] == [0.1, 0.1]
    assert result.markdown == UPRIGHT_TEXT and "Sideways" not in result.raw_answer


async def test_corrections_add_up_when_the_model_turns_the_page_in_steps() -> None:
    upright = marked_page_png()

    def one_quarter_at_a_time(body: dict[str, Any]) -> str:
        # A model that only ever says "90": three asks to undo a page turned by 90 (270 + 90 = 360).
        if correction_for(image_of(body)):
            return olmocr_answer("x", rotation_valid=False, rotation_correction=90)
        return olmocr_answer(UPRIGHT_TEXT)

    server = ScriptedVLM(one_quarter_at_a_time)
    async with server.client() as client:
        result = await build_engine("olmocr", client, settings(max_reasks=3)).extract(page(rotated(upright, 90)))
    assert result.requests == 4 and pixels(image_of(server.bodies[-1])) == pixels(upright)
    assert [correction_for(image_of(body)) for body in server.bodies] == [270, 180, 90, 0]


async def test_when_attempts_run_out_on_rotation_the_last_valid_answer_is_kept_as_olmocr_does() -> None:
    server = ScriptedVLM(lambda body: olmocr_answer("Still sideways", rotation_valid=False, rotation_correction=0))
    async with server.client() as client:
        result = await build_engine("olmocr", client, settings(max_reasks=2)).extract(page(marked_page_png()))
    assert result.requests == 3 and result.markdown == "Still sideways"


# ----------------------------------------------------------------------------- re-asks


async def test_a_garbled_front_matter_is_reasked_with_olmocrs_rising_temperature() -> None:
    answers = iter(
        [
            "# No front matter at all\n\nJust text.",
            "---\nprimary_language: en\nis_rotation_valid: [unclosed\n---\ntext",
            "---\nprimary_language: en\nis_rotation_valid: True\n---\ntext",  # fields missing
            olmocr_answer(UPRIGHT_TEXT),
        ]
    )
    server = ScriptedVLM(lambda body: next(answers))
    async with server.client() as client:
        result = await build_engine("olmocr", client, settings(max_reasks=5)).extract(page(marked_page_png()))
    assert [body["temperature"] for body in server.bodies] == [0.1, 0.1, 0.2, 0.3]
    assert result.requests == 4 and result.markdown == UPRIGHT_TEXT


async def test_a_truncated_answer_is_reasked_hotter_with_the_same_budget() -> None:
    answers = iter([(olmocr_answer("Cut off in the mi"), "length"), (olmocr_answer(UPRIGHT_TEXT), "stop")])
    server = ScriptedVLM(lambda body: next(answers))
    async with server.client() as client:
        result = await build_engine("olmocr", client, settings(max_tokens=512)).extract(page(marked_page_png()))
    assert [(body["temperature"], body["max_tokens"]) for body in server.bodies] == [(0.1, 512), (0.1, 512)]
    assert result.requests == 2 and result.markdown == UPRIGHT_TEXT


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("no front matter", "front_matter"),
        ((olmocr_answer(UPRIGHT_TEXT), "length"), "truncated"),
        ((olmocr_answer(UPRIGHT_TEXT), "content_filter"), "finish_content_filter"),
        (olmocr_answer(""), "empty"),
    ],
)
async def test_exhausted_attempts_reject_the_page_with_the_last_reason(answer: Any, reason: str) -> None:
    server = ScriptedVLM(lambda body: answer)
    async with server.client() as client:
        engine = build_engine("olmocr", client, settings(max_reasks=5))
        with pytest.raises(AnswerRejected) as caught:
            await engine.extract(page(marked_page_png()))
    assert caught.value.reason == reason and caught.value.requests == 6 == len(server.bodies)
    assert [body["temperature"] for body in server.bodies] == list(OLMOCR_TEMPERATURES[:6])
    assert "doc=d0 page=4" in str(caught.value) and reason in str(caught.value)


async def test_olmocrs_eight_attempts_bound_the_asks_and_the_last_temperature_is_1() -> None:
    server = ScriptedVLM(lambda body: "garbage")
    async with server.client() as client:
        engine = OlmOcrEngine(client, settings(), max_attempts=20)
        with pytest.raises(AnswerRejected) as caught:
            await engine.extract(page(marked_page_png()))
    assert caught.value.requests == 8
    assert [body["temperature"] for body in server.bodies] == [0.1, 0.1, 0.2, 0.3, 0.5, 0.8, 0.9, 1.0]


async def test_an_empty_answer_is_a_blank_page_when_the_page_has_no_text_layer() -> None:
    server = ScriptedVLM(lambda body: olmocr_answer("", language=None))
    async with server.client() as client:
        result = await build_engine("olmocr", client, settings()).extract(page(marked_page_png(), text_layer_chars=0))
    assert result.markdown == "" and result.content_list == [] and result.requests == 1


async def test_another_models_answer_is_not_a_page() -> None:
    import httpx

    from mkg_pipeline_tests.unit.scripted_vlm import chat_response

    def other_model(body: dict[str, Any]) -> httpx.Response:
        response = chat_response(olmocr_answer(UPRIGHT_TEXT))
        data = response.json()
        data["model"] = "someone/else"
        return httpx.Response(200, json=data)

    server = ScriptedVLM(other_model)
    async with server.client() as client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine("olmocr", client, settings()).extract(page(marked_page_png()))
    assert caught.value.reason == "model_mismatch"


# ----------------------------------------------------------------------------- the front matter parser


def test_parse_answer_reads_olmocrs_training_format() -> None:
    front, text = parse_answer(olmocr_answer("Hello\n\nworld", is_table=True))
    assert front == FrontMatter("en", True, 0, True, False) and text == "Hello\n\nworld"


@pytest.mark.parametrize(
    "answer",
    [
        "---\r\nprimary_language: en\r\nis_rotation_valid: true\r\nrotation_correction: '0'\r\nis_table: false\r\n"
        'is_diagram: "false"\r\n---\r\nHello',
        "```markdown\n---\nprimary_language: en\nis_rotation_valid: True\nrotation_correction: 0\nis_table: False\n"
        "is_diagram: False\n---  \nHello\n```",
        "\n\n---\nprimary_language: en\nis_rotation_valid: True\nrotation_correction: 0\nis_table: False\n"
        "is_diagram: False\n---\n\nHello\n",
    ],
)
def test_parse_answer_is_lenient_on_layout(answer: str) -> None:
    assert parse_answer(answer) == (FrontMatter("en", True, 0, False, False), "Hello")


def test_parse_answer_keeps_a_language_yaml_reads_as_a_boolean_and_null_as_none() -> None:
    assert parse_answer(olmocr_answer("Hei", language="no"))[0].primary_language == "no"
    assert parse_answer(olmocr_answer("", language=None)) == (FrontMatter(None, True, 0, False, False), "")


def test_parse_answer_reads_a_rotation() -> None:
    front, _ = parse_answer(olmocr_answer("x", rotation_valid=False, rotation_correction=270))
    assert (front.is_rotation_valid, front.rotation_correction) == (False, 270)


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        ("Hello", "does not start"),
        ("---\nprimary_language: en\n", "does not start"),
        ("---\n- a\n- b\n---\nx", "not a mapping"),
        ("---\nprimary_language: en\nis_rotation_valid: {\n---\nx", "not YAML"),
        (olmocr_answer("x").replace("is_diagram: False\n", ""), "missing is_diagram"),
        (olmocr_answer("x").replace("---\nx", "colour: red\n---\nx"), "unknown colour"),
        (olmocr_answer("x", rotation_correction=45), "rotation_correction is 45"),
        (olmocr_answer("x").replace("rotation_correction: 0", "rotation_correction: true"), "rotation_correction"),
        (olmocr_answer("x").replace("is_table: False", "is_table: maybe"), "is_table is 'maybe'"),
        (olmocr_answer("x").replace("primary_language: en", "primary_language: [en]"), "primary_language"),
        ("---\n" + "primary_language: en\n" * 400 + "---\nx", "characters"),
    ],
)
def test_parse_answer_refuses_what_is_not_olmocrs_format(answer: str, says: str) -> None:
    with pytest.raises(FrontMatterError, match=says):
        parse_answer(answer)
