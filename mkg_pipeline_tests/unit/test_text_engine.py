"""engines.text_layer: constructed pages whose structure is known, and the corpus against its text layer."""

from __future__ import annotations

import collections
import hashlib
import re
import statistics

import jsonschema
import pymupdf
import pytest

from mkg_pipeline.engines.base import PageResult
from mkg_pipeline.engines.page_safety import CONTENT_LIST_SCHEMA, safe_page_markdown, sanitize_table_html
from mkg_pipeline.engines.text_layer import extract_text_page, join_lines, page_plain_text
from mkg_pipeline.pdf.routing import route_page
from mkg_pipeline.quality.similarity import normalise_text, similarity
from mkg_pipeline_tests.fixtures.corpus import corpus_manifest, corpus_pdf
from mkg_pipeline_tests.fixtures.reading_order import column_order_agreement, text_layer_lines
from mkg_pipeline_tests.fixtures.routing_pages import (
    FIGURE_CAPTION,
    HEADER,
    LIST_ITEMS,
    PAGE_NUMBER,
    PARAGRAPHS,
    SECTIONS,
    TABLE_ROWS,
    TITLE,
    open_case,
    paper_lines,
    photo_jpeg,
    scan_with_ocr_pdf,
)


def extract(name: str, page_idx: int = 0) -> PageResult:
    with open_case(name) as doc:
        return extract_text_page(doc[0], page_idx)


def check_schema(result: PageResult, page_idx: int) -> None:
    jsonschema.validate(result.content_list, CONTENT_LIST_SCHEMA)
    assert all(item["page_idx"] == page_idx for item in result.content_list)
    assert all("bbox" in item for item in result.content_list)
    assert safe_page_markdown(result.markdown) == result.markdown  # already safe, as every engine's
    assert result.requests == 0 and result.finish_reason is None and result.model.startswith("pymupdf-")


def paragraphs_of(markdown: str) -> list[str]:
    return [part for part in markdown.split("\n\n") if part]


def test_born_digital_page_structure() -> None:
    result = extract("born_digital", page_idx=4)
    check_schema(result, 4)
    parts = paragraphs_of(result.markdown)
    assert parts[0] == f"# {TITLE}"
    assert f"## {SECTIONS[0]}" in parts and f"## {SECTIONS[1]}" in parts
    # paragraphs joined whole, the hyphenated "sedi-/ment" undone
    for paragraph in PARAGRAPHS:
        assert paragraph in parts
    assert "sedi-" not in result.markdown
    assert [f"- {item}" for item in LIST_ITEMS] == [p for p in parts if p.startswith("- ")]
    # running header and page number: page furniture, out of the Markdown, in the content list
    assert HEADER not in result.markdown and PAGE_NUMBER not in parts
    kinds = {item["type"]: item for item in result.content_list if item["type"] in {"header", "page_number"}}
    assert kinds["header"]["text"] == HEADER and kinds["page_number"]["text"] == PAGE_NUMBER
    titles = [(i["text"], i.get("text_level")) for i in result.content_list if i.get("text_level")]
    assert titles == [(TITLE, 1), (SECTIONS[0], 2), (SECTIONS[1], 2)]
    # boxes in 0..1000 of the page: the header sits at the top, the page number at the bottom
    assert kinds["header"]["bbox"][3] < 100 and kinds["page_number"]["bbox"][1] > 900


def test_two_columns_read_column_by_column() -> None:
    one, two = extract("born_digital"), extract("born_digital_two_columns")
    assert paragraphs_of(two.markdown) == paragraphs_of(one.markdown)
    # the paragraph broken by the column end is one paragraph again
    assert PARAGRAPHS[2] in paragraphs_of(two.markdown)


@pytest.mark.parametrize("name", ["rotated_page", "rotated_text"])
def test_rotated_page_comes_out_upright_in_reading_order(name: str) -> None:
    upright, rotated = extract("born_digital"), extract(name)
    check_schema(rotated, 0)
    assert rotated.markdown == upright.markdown
    header = next(item for item in rotated.content_list if item["type"] == "header")
    if name == "rotated_page":
        # /Rotate 90: the header, at the top of the portrait content, is on the right of the displayed page
        assert header["bbox"][0] > 900


def test_table_and_figure() -> None:
    result = extract("table_and_figure")
    check_schema(result, 0)
    table = next(item for item in result.content_list if item["type"] == "table")
    assert table["table_body"] == sanitize_table_html(table["table_body"])
    assert table["table_body"].startswith("<table><tr><th>Station</th>")
    for row in TABLE_ROWS:
        for cell in row:
            assert f">{cell}</t" in table["table_body"]
    assert table["table_caption"] == ["Table 1: Daily means at the three stations."]
    # cells are in the table only, not repeated as paragraphs
    assert "Upper gauge" not in result.markdown.replace(table["table_body"], "")

    image = next(item for item in result.content_list if item["type"] == "image")
    assert image["image_caption"] == [FIGURE_CAPTION]
    assert list(result.images) == [image["img_path"]]
    jpeg = result.images[image["img_path"]]
    assert jpeg[:3] == b"\xff\xd8\xff"
    assert image["img_path"] == f"images/{hashlib.sha256(jpeg).hexdigest()}.jpg"
    assert f"]({image['img_path']})" in result.markdown
    # the same page gives the same crop, byte for byte (content-addressed storage)
    assert extract("table_and_figure").images == result.images
    order = [item["type"] for item in result.content_list]
    assert order.index("table") < order.index("image")


def test_ocr_layer_page_is_read_from_its_invisible_text_without_the_scan_as_a_figure() -> None:
    with pymupdf.open("pdf", scan_with_ocr_pdf(garbage=False)) as doc:
        result = extract_text_page(doc[0], 0)
    check_schema(result, 0)
    assert result.images == {}
    assert f"# {TITLE}" in result.markdown
    assert PARAGRAPHS[1] in paragraphs_of(result.markdown)


def test_invisible_junk_on_a_born_digital_page_is_left_out() -> None:
    made = pymupdf.open()
    page = made.new_page()
    for line in paper_lines():
        page.insert_text((line.x, line.y), line.text, fontname=line.font, fontsize=line.size)
    page.insert_text((72, 300), "cheap watches casino keywords", fontname="helv", fontsize=10, render_mode=3)
    with pymupdf.open("pdf", made.tobytes()) as doc:
        result = extract_text_page(doc[0], 0)
    assert "casino" not in result.markdown
    assert "casino" not in page_plain_text(result)


def test_markup_in_the_text_layer_stays_text() -> None:
    made = pymupdf.open()
    page = made.new_page()
    page.insert_text((72, 100), "# not a heading <script>alert(1)</script> costs $5 and $6", fontname="helv")
    page.insert_text((72, 120), "and a second line of the same paragraph, long enough to be prose.", fontname="helv")
    with pymupdf.open("pdf", made.tobytes()) as doc:
        result = extract_text_page(doc[0], 0)
    assert "<script>" not in result.markdown
    assert result.markdown.startswith("\\# not a heading &lt;script")
    assert "\\$5 and \\$6" in result.markdown


def test_join_lines() -> None:
    assert join_lines(["the trans-", "port of sedi-", "ment"]) == "the transport of sediment"
    assert join_lines(["the Navier-", "Stokes equations"]) == "the Navier-Stokes equations"
    # a compound broken at one of its hyphens keeps it: the continuation is itself hyphenated
    # (before the fix: "massto-temperature", as on arxiv-0908.0054 p3)
    assert join_lines(["the mass-", "to-temperature ratio"]) == "the mass-to-temperature ratio"
    assert join_lines(["a state-of-the-", "art model"]) == "a state-of-the-art model"  # a hyphen before it
    assert join_lines(["see Fig-", "ure 2 and the trans-", "port."]) == "see Figure 2 and the transport."
    assert join_lines(["the COVID-", "19 cases"]) == "the COVID-19 cases"
    assert join_lines(["soft\u00ad", "hyphen"]) == "softhyphen"
    assert join_lines(["日本語の", "文章"]) == "日本語の文章"


# --------------------------------------------------------------------------- the shared corpus


@pytest.mark.parametrize("name", ["multicolumn-3p.pdf", "arxiv-0807.3577-physics-15p.pdf"])
def test_corpus_multicolumn_reads_column_by_column(name: str) -> None:
    """The text layer of these files lists lines in reading order: the engine must keep it (> 0.9 of
    lines in order per page; reading across the columns scores about 0.5)."""
    path = corpus_pdf(name)
    with pymupdf.open(path) as doc:
        for page in doc:
            result = extract_text_page(page, page.number)
            agreement = column_order_agreement(result.markdown, text_layer_lines(str(path), page.number))
            assert agreement.share > 0.9, (name, page.number + 1, agreement.share)
            for column in ("left", "right"):
                assert agreement.column_share(column) > 0.9, (name, page.number + 1, column)


#: the born-digital files; geotopo's first 20 pages stand for the book (117 pages would take a minute)
QUALITY_FILES = {
    name: None
    for name, entry in corpus_manifest().items()
    if entry["expect"] == "ok" and name not in {"edgar-scanned.pdf", "scanned-images-6p.pdf"}
}
QUALITY_FILES["geotopo-book-117p.pdf"] = range(20)


def _dehyphenated(text: str) -> str:
    return re.sub(r"(\w)[-\u00ad]\n(?=[a-zäöüß])", r"\1", text)


@pytest.mark.parametrize("name", sorted(QUALITY_FILES))
def test_corpus_text_engine_agrees_with_the_text_layer(name: str) -> None:
    """On every page the routing sends to the text route, the engine keeps the text layer's words
    (recall >= 0.95 of them; a plot's axis labels go into its crop) and, by rapidfuzz ratio, its text:
    the ratio is lower where the engine reorders (columns, furniture moved to the end)."""
    pages = QUALITY_FILES[name]
    ratios = []
    with pymupdf.open(corpus_pdf(name)) as doc:
        for page in doc:
            if (pages is not None and page.number not in pages) or route_page(page).route != "text":
                continue
            result = extract_text_page(page, page.number)
            jsonschema.validate(result.content_list, CONTENT_LIST_SCHEMA)
            mine = page_plain_text(result)
            layer = _dehyphenated(page.get_text())
            ours, theirs = (
                collections.Counter(normalise_text(mine).split()),
                collections.Counter(normalise_text(layer).split()),
            )
            total = sum(theirs.values())
            recall = 1 - sum((theirs - ours).values()) / total if total else 1.0
            limit = 0.84 if name.startswith("geotopo") else 0.95
            assert recall >= limit, (name, page.number + 1, recall, list((theirs - ours).elements())[:20])
            ratios.append(similarity(mine, layer))
    if ratios:
        assert min(ratios) >= 0.6, (name, ratios)
        assert statistics.median(ratios) >= 0.8, (name, ratios)


def test_a_text_route_page_assembles_with_vlm_pages() -> None:
    """The stage stores the engine's result as any page record: a document mixing routes assembles."""
    from mkg_pipeline.document import assemble_document

    text_page = extract("table_and_figure", page_idx=1)
    vlm_item = {"type": "text", "text": "A page from the VLM.", "page_idx": 0}
    vlm_page = {"page": 1, "markdown": "A page from the VLM.", "content_list": [vlm_item]}
    record = {"page": 2, "markdown": text_page.markdown, "content_list": text_page.content_list}
    document, content = assemble_document([vlm_page, record])
    jsonschema.validate(content, CONTENT_LIST_SCHEMA)
    assert "<!-- page 2 -->" in document and "<table><tr><th>Station</th>" in document
    assert {item["page_idx"] for item in content} == {0, 1}


@pytest.mark.parametrize(
    "name", ["edgar-scanned.pdf", "scanned-images-6p.pdf", "rotated-arabic-4p.pdf", "zfn-chemistry-2p.pdf"]
)
def test_forced_text_route_on_vlm_pages_still_gives_a_valid_page(name: str) -> None:
    """routing.mode=text (a user who knows better) sends every page here: scans and broken layers too."""
    with pymupdf.open(corpus_pdf(name)) as doc:
        for page in doc:
            result = extract_text_page(page, page.number)
            check_schema(result, page.number)
            for path, jpeg in result.images.items():
                assert path == f"images/{hashlib.sha256(jpeg).hexdigest()}.jpg"


def _two_regions_under_a_rule_pdf() -> bytes:
    """A two-column body, a rule across the page, then a two-column reference list (arXiv's last page)."""
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    blocks = {
        "body left": (54, 80),
        "body right": (317, 80),
        "refs left": (54, 420),
        "refs right": (317, 420),
    }
    for name, (x, y) in blocks.items():  # written in reading order, as LaTeX does
        for row in range(6):
            page.insert_text((x, y + 12 * row), f"{name} line {row} with enough words to read", fontsize=9)
    page.draw_line((185, 385), (430, 385), width=0.5)
    data = doc.tobytes()
    doc.close()
    return data


def test_a_rule_across_the_columns_ends_a_two_column_region() -> None:
    """Without the rule as a boundary, both regions share a gutter and read as one: all of the left
    column (body, then references) before the right (before the fix: body left, refs left, body right)."""
    with pymupdf.open(stream=_two_regions_under_a_rule_pdf(), filetype="pdf") as doc:
        markdown = extract_text_page(doc[0], 0).markdown
    starts = [markdown.index(f"{name} line 0") for name in ("body left", "body right", "refs left", "refs right")]
    assert starts == sorted(starts), markdown


def test_corpus_arxiv_last_page_reads_body_then_references() -> None:
    """arxiv-0908.0054 p4: two-column conclusions, a rule, two-column references (column order agreement
    0.708 before the rule ended the region; the VLM path reads it at 1.0)."""
    path = corpus_pdf("arxiv-0908.0054-4p.pdf")
    with pymupdf.open(path) as doc:
        result = extract_text_page(doc[3], 3)
    agreement = column_order_agreement(result.markdown, text_layer_lines(str(path), 3))
    assert agreement.share > 0.9, agreement.share
    assert min(agreement.column_share(c) for c in ("left", "right")) > 0.9


def _stacked_figures_pdf() -> bytes:
    """Two figures, each with its caption below it, the first caption nearer the second figure (10 pt)
    than its own (13 pt), as on arxiv-0908.0054 p3."""
    made = pymupdf.open()
    page = made.new_page()
    page.insert_image(pymupdf.Rect(72, 60, 372, 220), stream=photo_jpeg(600, 320, seed=1))
    page.insert_text((72, 240), "Figure 1: The upper figure, its caption below it.", fontname="tiro", fontsize=9)
    page.insert_image(pymupdf.Rect(72, 252, 372, 412), stream=photo_jpeg(600, 320, seed=2))
    page.insert_text((72, 432), "Figure 2: The lower figure, its caption below it.", fontname="tiro", fontsize=9)
    return made.tobytes()


def test_a_figure_caption_goes_to_the_figure_above_it_even_when_the_next_figure_is_nearer() -> None:
    """Before the fix the caption went to the nearest figure: "Figure 1" to the lower figure."""
    with pymupdf.open(stream=_stacked_figures_pdf(), filetype="pdf") as doc:
        result = extract_text_page(doc[0], 0)
    images = sorted((i for i in result.content_list if i["type"] == "image"), key=lambda i: i["bbox"][1])
    assert [i["image_caption"] for i in images] == [
        ["Figure 1: The upper figure, its caption below it."],
        ["Figure 2: The lower figure, its caption below it."],
    ]


def test_corpus_arxiv_figure_captions_go_to_the_figures_above_them() -> None:
    """arxiv-0908.0054 p3: five figures in two columns, each caption below its figure and nearer the
    next figure (Figure 2: 10 pt to the figure below, 13 pt to its own); before the fix every caption
    moved one figure down and the top figures had none."""
    with pymupdf.open(corpus_pdf("arxiv-0908.0054-4p.pdf")) as doc:
        result = extract_text_page(doc[2], 2)
    images = sorted((i for i in result.content_list if i["type"] == "image"), key=lambda i: i["bbox"][:2])
    numbers = [[caption.split(":")[0] for caption in i["image_caption"]] for i in images]
    assert numbers == [["Figure 2"], ["Figure 3"], ["Figure 4"], ["Figure 5"], ["Figure 6"]], numbers
