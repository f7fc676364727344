"""pdf.routing: constructed pages whose right route is known, each signal on its own, and the corpus."""

from __future__ import annotations

import dataclasses
import json

import pymupdf
import pytest

from mkg_pipeline.pdf.routing import (
    TEXT_THRESHOLD,
    PageFeatures,
    decide,
    is_bad_char,
    page_features,
    route_page,
    word_stats,
)
from mkg_pipeline_tests.fixtures.corpus import corpus_manifest, corpus_pdf
from mkg_pipeline_tests.fixtures.routing_pages import CASES, open_case, paper_lines, scan_with_ocr_pdf


@pytest.mark.parametrize("name", sorted(CASES))
def test_constructed_page_takes_its_known_route(name: str) -> None:
    expected = CASES[name][0]
    with open_case(name) as doc:
        decision = route_page(doc[0])
    assert decision.route == expected, decision.as_json()
    assert (decision.score >= TEXT_THRESHOLD) == (expected == "text")
    # what the page manifest stores is plain JSON
    assert json.loads(json.dumps(decision.as_json())) == decision.as_json()


def test_scan_without_text_layer_is_decided_by_its_missing_text() -> None:
    with open_case("scan_no_text_layer") as doc:
        decision = route_page(doc[0])
    assert decision.features.chars == 0
    assert decision.features.image_coverage == 1.0
    assert {"chars", "image_coverage"} <= set(decision.failed)


def test_garbage_ocr_layer_is_read_as_an_ocr_layer_and_distrusted() -> None:
    with open_case("scan_ocr_layer_garbage") as doc:
        decision = route_page(doc[0])
    features = decision.features
    assert features.ocr_layer and features.visible_chars == 0 and features.invisible_chars > 1000
    assert decision.decided_by == "word_plausibility"
    # the scan's full-page image is expected under an OCR layer: only its language is held against it
    assert decision.margins["image_coverage"] == 1.0


def test_a_clean_ocr_layer_over_a_scan_is_trusted() -> None:
    """Someone's OCR that reads like language is used (the documented choice): the image under it is
    the page itself, and the stricter plausibility bar for OCR layers is met."""
    with pymupdf.open("pdf", scan_with_ocr_pdf(garbage=False)) as doc:
        decision = route_page(doc[0])
    assert decision.features.ocr_layer
    assert decision.route == "text", decision.as_json()


def test_cid_font_without_tounicode_is_caught_by_the_font_itself() -> None:
    with open_case("cid_fonts_without_tounicode") as doc:
        features = page_features(doc[0])
    assert features.unmapped_fonts and features.unmapped_font_chars == features.chars > 1000
    # even if its glyph ids happened to be letters, the font alone sends the page to the VLM
    masked = dataclasses.replace(features, bad_chars=0, plausible_words=features.words or 1, words=features.words or 1)
    masked = dataclasses.replace(masked, alnum_ratio=0.9)
    decision = decide(masked)
    assert decision.route == "vlm" and decision.decided_by == "unmapped_fonts", decision.as_json()


def test_the_same_font_with_its_tounicode_is_trusted() -> None:
    doc = pymupdf.open()
    page = doc.new_page()
    page.insert_font(fontname="F1", fontbuffer=pymupdf.Font("tiro").buffer)
    for line in paper_lines():
        page.insert_text((line.x, line.y), line.text, fontname="F1", fontsize=line.size)
    doc.subset_fonts()
    with pymupdf.open("pdf", doc.tobytes()) as reopened:
        decision = route_page(reopened[0])
    assert decision.features.unmapped_fonts == []
    assert decision.route == "text", decision.as_json()


def test_big_image_with_three_words() -> None:
    with open_case("big_image_three_words") as doc:
        decision = route_page(doc[0])
    assert decision.features.words == 3
    assert decision.features.image_coverage > 0.8
    assert {"chars", "image_coverage"} <= set(decision.failed)


@pytest.mark.parametrize("name", ["rotated_page", "rotated_text"])
def test_rotated_born_digital_pages_take_the_text_route(name: str) -> None:
    with open_case(name) as doc:
        decision = route_page(doc[0])
    assert decision.route == "text"
    assert decision.features.off_direction_chars == 0


def test_blank_page_costs_no_vlm_request_but_a_white_drawing_is_not_enough() -> None:
    made = pymupdf.open()
    made.new_page().draw_rect(pymupdf.Rect(0, 0, 595, 842), color=None, fill=(1, 1, 1))
    made.new_page().draw_line((72, 72), (300, 300), color=(0, 0, 0))  # maybe outlined text, maybe a chart
    with pymupdf.open("pdf", made.tobytes()) as doc:
        blank, drawn = route_page(doc[0]), route_page(doc[1])
    assert (blank.route, blank.decided_by) == ("text", "blank")
    assert drawn.route == "vlm" and drawn.decided_by == "chars"


def _good_features() -> PageFeatures:
    with open_case("born_digital") as doc:
        return page_features(doc[0])


@pytest.mark.parametrize(
    ("signal", "change"),
    [
        ("chars", {"chars": 40}),
        ("bad_chars", {"bad_chars": 60}),
        ("word_plausibility", {"plausible_words": 150}),
        ("alnum_ratio", {"alnum_ratio": 0.25}),
        ("space_ratio", {"space_ratio": 0.75}),
        ("newline_ratio", {"newline_ratio": 0.65}),
        ("image_coverage", {"image_coverage": 0.85}),
        ("outside_text", {"outside_chars": 1000}),
        ("off_direction", {"off_direction_chars": 600}),
    ],
)
def test_each_signal_alone_sends_a_page_to_the_vlm(signal: str, change: dict[str, object]) -> None:
    good = _good_features()
    assert decide(good).route == "text"
    decision = decide(dataclasses.replace(good, **change))  # type: ignore[arg-type]
    assert decision.route == "vlm" and decision.decided_by == signal, decision.as_json()


def test_passing_every_peer_threshold_by_a_hair_is_not_enough() -> None:
    """Sound beats greedy: 49 bad characters in 1,700 (2.9 %, under Marker's 3 %) still goes to the VLM."""
    good = _good_features()
    decision = decide(dataclasses.replace(good, chars=1700, bad_chars=49))
    assert decision.margins["bad_chars"] < TEXT_THRESHOLD
    assert decision.route == "vlm"


def test_bad_characters_and_word_plausibility() -> None:
    assert is_bad_char("\ufffd") and is_bad_char("\ue001") and is_bad_char("\x01")
    assert not is_bad_char("é") and not is_bad_char("\n") and not is_bad_char("∑")
    words, plausible = word_stats("The rivers (e.g. H2O, 3D) carry 1,234.5 kg/s — Müller's McDonald x = y + 2")
    assert words == plausible  # symbols and numbers are not held against a page
    words, plausible = word_stats("l|l1 ;rnm1I tHiSs qzxwvk 5IF\x01RVJDL")
    assert plausible == 0 and words == 4


# --------------------------------------------------------------------------- the shared corpus

#: pages that must go to the VLM; every other page of these files is born-digital and must take the text route
CORPUS_VLM_PAGES = {
    "edgar-scanned.pdf": "all",  # a scanned web page, no text layer
    "scanned-images-6p.pdf": "all",  # 3.84 pt pages, one image and a word each
    "rotated-arabic-4p.pdf": "all",  # 24 characters a page, a quarter of them U+FFFD
    "zfn-chemistry-2p.pdf": {1},  # a scanned journal page with an OCR layer that garbles its formulas
    "two-pages.pdf": {1},  # a picture and no text
}
#: mathematics whose fonts map to U+FFFD / private use (CMEX10, CMSY10), or formula-dense pages whose
#: tokens are not words: the VLM (LaTeX) is the better reader; the rest of the book is text
GEOTOPO_VLM = {1, 5, 15, 17, 29, 46, 84, 85, 86, 92, 98, 99, 108}


def _corpus_files() -> list[str]:
    return [name for name, entry in corpus_manifest().items() if not entry["expect"].startswith("reject")]


@pytest.mark.parametrize("name", _corpus_files())
def test_corpus_routes(name: str) -> None:
    entry = corpus_manifest()[name]
    with pymupdf.open(corpus_pdf(name)) as doc:
        assert doc.page_count == entry["pages"]
        routes = {page.number + 1: route_page(page) for page in doc}
    vlm = CORPUS_VLM_PAGES.get(name, GEOTOPO_VLM if name.startswith("geotopo") else set())
    expected_vlm = set(routes) if vlm == "all" else vlm
    got_vlm = {number for number, decision in routes.items() if decision.route == "vlm"}
    assert got_vlm == expected_vlm, {n: routes[n].as_json() for n in got_vlm ^ set(expected_vlm)}
    if entry.get("text_layer_chars") == 0 and name != "blank-page.pdf":
        assert not got_vlm ^ set(routes), "a file without a text layer takes the text route somewhere"


def test_outlined_text_is_visible_text() -> None:
    """Render mode 1 (stroked, not filled) is seen by a reader: it is not an OCR layer."""
    made = pymupdf.open()
    page = made.new_page()
    for line in paper_lines():
        page.insert_text((line.x, line.y), line.text, fontname=line.font, fontsize=line.size, render_mode=1)
    with pymupdf.open("pdf", made.tobytes()) as doc:
        features = page_features(doc[0])
    assert features.invisible_chars == 0 and features.visible_chars > 1000
    assert not features.ocr_layer
