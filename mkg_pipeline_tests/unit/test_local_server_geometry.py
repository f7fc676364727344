"""The local server's page geometry on synthetic line boxes: reading order, paragraphs, furniture,
figures, tables and MinerU's formats. No model: lines are boxes with text, images are drawn."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from mineru_vl_utils.post_process import convert_otsl_to_html

from mkg_devstack.local_server.blocks import (
    Block,
    BlockType,
    blocks_to_markdown,
    build_page,
    lines_to_markdown,
    lines_to_text,
)
from mkg_devstack.local_server.geometry import (
    OcrLine,
    Rect,
    Row,
    Visual,
    VisualKind,
    drop_edge_slivers,
    find_gutter,
    group_rows,
    join_rows,
)
from mkg_devstack.local_server.mineru_format import format_layout, format_table
from mkg_devstack.local_server.regions import find_regions, table_rules
from mkg_devstack.local_server.tables import table_grid, to_markdown, to_otsl
from mkg_pipeline_tests.fixtures.local_server import mineru_layout_parser

BODY_H = 20.0  # synthetic body text: 20 px tall rows, 8 px per character, 24 px pitch
PAGE_W, PAGE_H = 1000.0, 1400.0


def line(x1: float, y1: float, text: str, *, advance: float = 8.0, height: float = BODY_H) -> OcrLine:
    """A synthetic OCR line whose width follows its text, like real type."""
    return OcrLine(x1, y1, x1 + advance * len(text), y1 + height, text)


def paragraph(
    x1: float, y1: float, words: str, rows: int, *, indent: float = 0.0, pitch: float = 24.0, chars: int = 48
) -> list[OcrLine]:
    """``rows`` justified rows of ``chars`` characters, the first indented by ``indent`` px."""
    lines = []
    for index in range(rows):
        text = f"{words} {index}".ljust(chars, "x")
        left = x1 + (indent if index == 0 else 0.0)
        lines.append(OcrLine(left, y1 + index * pitch, x1 + 8.0 * chars, y1 + index * pitch + BODY_H, text))
    return lines


def order(lines: list[OcrLine], **page: Any) -> list[str]:
    """Texts of the page's rows in reading order."""
    return [row.text for block in build_page(lines, height=PAGE_H, **page) for row in block.rows]


def texts(lines: list[OcrLine]) -> list[str]:
    return [item.text for item in lines]


# --------------------------------------------------------------------------- rows and columns


def test_rows_join_pieces_left_to_right_with_a_space() -> None:
    lines = [line(300, 101, "world"), line(100, 100, "hello"), line(100, 140, "next row")]
    assert [row.text for row in group_rows(lines)] == ["hello world", "next row"]


def test_two_columns_read_column_by_column_between_a_spanning_title_and_footnote() -> None:
    title = line(150, 120, "A Two Column Title", advance=16.0, height=34.0)
    left = paragraph(100, 200, "left", 10)
    right = paragraph(540, 200, "right", 10)
    footnote = line(100, 500, "a footnote spanning the whole page width", advance=20.0)  # under both columns
    assert find_gutter([*left, *right]) is not None
    assert order([title, *right, *left, footnote]) == [
        title.text,
        *texts(left),
        *texts(right),
        footnote.text,
    ]


def test_a_column_with_a_large_gap_stays_one_column() -> None:
    # multicolumn-3p p2: the right column stops half way down, and resumes near the bottom.
    left = paragraph(100, 200, "left", 30)
    right_top = paragraph(540, 200, "top", 8)
    right_bottom = paragraph(540, 200 + 22 * 24, "bottom", 8)
    assert order([*right_bottom, *left, *right_top]) == [*texts(left), *texts(right_top), *texts(right_bottom)]


def test_a_line_poking_into_the_gutter_stays_in_its_column() -> None:
    # A right-column line whose box starts with a sliver of its left neighbour's last glyph.
    left = paragraph(100, 200, "left", 10)
    right = paragraph(540, 200, "right", 10)
    right[4] = OcrLine(515, right[4].y1, right[4].x2, right[4].y2, "h " + right[4].text)
    assert order([*left, *right]) == [*texts(left), *texts(right)]


def test_a_rule_across_the_gutter_starts_a_new_band() -> None:
    # arXiv p4: body text in two columns, a rule, then the references in two columns.
    body_left, body_right = paragraph(100, 200, "body left", 8), paragraph(540, 200, "body right", 8)
    refs_left, refs_right = paragraph(100, 480, "refs left", 6), paragraph(540, 480, "refs right", 6)
    rule = Rect(300, 430, 700, 432)
    lines = [*refs_right, *body_right, *refs_left, *body_left]
    assert order(lines, rules=[rule]) == [*texts(body_left), *texts(body_right), *texts(refs_left), *texts(refs_right)]
    # Without the rule, each column reads through: the references interleave with the body.
    assert order(lines)[: len(body_left) + len(refs_left)] == [*texts(body_left), *texts(refs_left)]


def test_one_column_and_narrow_table_cells_are_not_split_into_columns() -> None:
    assert find_gutter(paragraph(100, 100, "body", 12)) is None
    table = [line(100, 100 + 24 * i, f"name {i}") for i in range(8)] + [
        line(600, 100 + 24 * i, f"value {i}") for i in range(8)
    ]
    assert find_gutter(table) is None
    assert group_rows(table)[0].text == "name 0 value 0"


def test_vertical_lines_are_margin_text_read_after_the_body() -> None:
    stamp = OcrLine(10, 100, 30, 400, "arXiv:0000.0000v1 [cs.XX] 1 Jan 2000", vertical=True)
    body = paragraph(100, 100, "body", 5)
    blocks = build_page([stamp, *body], height=PAGE_H)
    assert blocks[-1].type is BlockType.ASIDE_TEXT and blocks[-1].text == stamp.text
    assert all(stamp.text not in block.text for block in blocks[:-1])
    # Alone on its page, vertical text is the page's text, not margin paratext a client may drop.
    assert [block.type for block in build_page([stamp], height=PAGE_H)] == [BlockType.TEXT]


# --------------------------------------------------------------------------- paragraphs and titles


def test_paragraphs_split_at_gaps_and_indents_and_titles_are_typed_by_size() -> None:
    title = line(100, 60, "Big Title", advance=18.0, height=36.0)  # >= 1.75x body: level 1
    section = line(100, 130, "1 Introduction", advance=11.0, height=24.0)  # >= 1.3x body: level 2
    first = paragraph(100, 170, "first", 3)
    second = paragraph(100, 170 + 3 * 24, "second", 3, indent=30.0)  # no gap, but an indented first line
    third = paragraph(100, 170 + 6 * 24 + 25, "third", 2)  # a blank gap before it
    blocks = build_page([title, section, *first, *second, *third], height=PAGE_H)
    assert [block.type for block in blocks] == [
        BlockType.DOC_TITLE,
        BlockType.PARAGRAPH_TITLE,
        BlockType.TEXT,
        BlockType.TEXT,
        BlockType.TEXT,
    ]
    parts = blocks_to_markdown(blocks).split("\n\n")
    assert parts == [
        "# Big Title",
        "## 1 Introduction",
        " ".join(texts(first)),
        " ".join(texts(second)),
        " ".join(texts(third)),
    ]


def test_hanging_indents_split_at_each_item_not_at_each_continuation() -> None:
    # A reference list: each item's first row at the left edge, its continuation rows indented.
    rows = []
    for item in range(4):
        y = 200 + item * 2 * 24
        rows.append(OcrLine(100, y, 484, y + BODY_H, f"[{item}] Author, Title of work {item}".ljust(48, "x")))
        rows.append(OcrLine(130, y + 24, 484, y + 24 + BODY_H, f"continued {item}".ljust(44, "y")))
    blocks = build_page(rows, height=PAGE_H)
    assert len(blocks) == 4
    assert all(block.text.startswith(f"[{index}]") for index, block in enumerate(blocks))


def test_a_centred_formula_stands_alone_and_the_text_after_it_is_a_new_block() -> None:
    before = paragraph(100, 200, "before", 3)
    formula = line(250, 272, "E = mc2 (1)", advance=9.0)
    after = paragraph(100, 296, "after", 2)
    blocks = build_page([*before, formula, *after], height=PAGE_H)
    assert [block.text for block in blocks] == [" ".join(texts(before)), formula.text, " ".join(texts(after))]


def test_formula_sized_rows_are_not_headings() -> None:
    formula = line(100, 60, "ds2=a2{-(1+2w)dt2}(1)", advance=14.0)
    assert lines_to_markdown([formula, *paragraph(100, 100, "body", 4)]).startswith("ds2=")


@pytest.mark.parametrize(
    ("rows", "joined"),
    [
        (["an exam-", "ple of it"], "an example of it"),  # a word split by the typesetter
        (["the Bose-", "Einstein condensate"], "the Bose-Einstein condensate"),  # a capital: a real hyphen
        (["COVID-", "19 cases"], "COVID-19 cases"),
        (["a well-", "known rule"], "a wellknown rule"),  # the documented price of the simple rule
        (["pages 1158 -", "1161"], "pages 1158 - 1161"),  # a dash after a number is not hyphenation
        (["Vestibu--", "lum diam"], "Vestibulum diam"),  # an OCR double hyphen
        (["plain", "rows"], "plain rows"),
    ],
)
def test_hyphenation_at_row_ends_is_undone_when_the_next_row_continues_the_word(rows: list[str], joined: str) -> None:
    assert join_rows(rows) == joined


def test_recognition_text_joins_rows_with_spaces_and_paragraphs_with_newlines() -> None:
    first = paragraph(0, 0, "one", 2)
    second = paragraph(0, 2 * 24 + 30, "two", 2)
    assert lines_to_text([*first, *second]) == "\n".join([" ".join(texts(first)), " ".join(texts(second))])
    assert lines_to_text([]) == "" and lines_to_markdown([]) == ""


def test_edge_slivers_of_neighbouring_lines_are_dropped() -> None:
    lines = [OcrLine(0, 0, 500, 6, "noise"), *paragraph(0, 10, "kept", 3)]
    assert drop_edge_slivers(lines, 500, 90)[0].text.startswith("kept")


# --------------------------------------------------------------------------- page furniture


def test_running_head_page_number_and_footer_are_typed_and_read_at_the_edges() -> None:
    head = line(100, 40, "Journal of Synthetic Results")
    number = line(880, 40, "12")
    body = paragraph(100, 140, "body", 40)
    footer = line(100, 1340, "Copyright 2024, some publisher")
    page_of = line(800, 1340, "Page 2 of 6")
    blocks = build_page([footer, *body, number, head, page_of], height=PAGE_H)
    typed = {block.text: block.type for block in blocks}
    assert typed[head.text] is BlockType.HEADER
    assert typed["12"] is BlockType.PAGE_NUMBER
    assert typed[footer.text] is BlockType.FOOTER
    assert typed["Page 2 of 6"] is BlockType.PAGE_NUMBER
    assert blocks[0].type is BlockType.HEADER and blocks[-1].type in {BlockType.FOOTER, BlockType.PAGE_NUMBER}


def test_a_centred_page_number_under_two_columns_is_read_last() -> None:
    left, right = paragraph(100, 140, "left", 40), paragraph(540, 140, "right", 40)
    number = line(496, 1180, "3")  # centred on the gutter, under both columns (83% of the page height)
    blocks = build_page([number, *left, *right], height=PAGE_H)
    assert blocks[-1].type is BlockType.PAGE_NUMBER and blocks[-1].text == "3"


def test_a_title_at_the_top_of_the_page_is_not_a_running_head() -> None:
    title = line(200, 60, "Ultra Light Title", advance=18.0, height=36.0)
    blocks = build_page([title, *paragraph(100, 130, "body", 30)], height=PAGE_H)
    assert blocks[0].type is BlockType.DOC_TITLE


# --------------------------------------------------------------------------- figures and tables


def test_a_figure_is_an_image_block_in_its_column_and_owns_its_labels() -> None:
    left = paragraph(100, 200, "left", 20)
    caption = paragraph(540, 500, "Figure 1: a caption", 2)
    right = paragraph(540, 580, "right", 10)
    figure = Visual(540, 200, 924, 480, VisualKind.IMAGE)
    label = line(700, 300, "10^3")  # a tick label inside the figure
    blocks = build_page([*left, *caption, *right, label], height=PAGE_H, visuals=[figure])
    kinds = [block.type for block in blocks]
    assert kinds.count(BlockType.IMAGE) == 1
    image = kinds.index(BlockType.IMAGE)
    assert blocks[image - 1].text.startswith("left")  # after the left column, first in the right one
    assert blocks[image + 1].text.startswith("Figure 1")
    assert all("10^3" not in block.text for block in blocks)
    assert "10^3" not in blocks_to_markdown(blocks)  # figures are left out of the page's Markdown


TABLE = [
    [(100, "Country"), (300, "Population"), (520, "Capital")],
    [(100, "Austria"), (300, "8.9"), (520, "Vienna")],
    [(100, "Czech Republic"), (300, "10.7"), (520, "Prague")],
]


def table_lines(top: float = 100.0) -> list[OcrLine]:
    return [line(x, top + 24 * row, text) for row, cells in enumerate(TABLE) for x, text in cells]


def test_table_grid_to_otsl_to_html_through_mineru() -> None:
    grid = table_grid(table_lines())
    otsl = to_otsl(grid)
    assert otsl.count("<nl>") == 3 and otsl.startswith("<fcel>Country<fcel>Population<fcel>Capital<nl>")
    html = convert_otsl_to_html(format_table(grid))
    assert html.startswith("<table>") and "<td>Czech Republic</td><td>10.7</td><td>Prague</td>" in html
    assert to_markdown(grid).splitlines()[:3] == [
        "| Country | Population | Capital |",
        "|---|---|---|",
        "| Austria | 8.9 | Vienna |",
    ]


def test_table_cells_wrap_between_rules_and_a_wide_line_spans_columns() -> None:
    lines = [
        line(100, 100, "7c"),
        line(300, 100, "Electrical and electronic"),
        line(300, 124, "components with lead"),  # wrapped: nothing in the first column
        line(100, 160, "15"),
        line(300, 160, "Lead in solders"),
        line(100, 196, "Date of Inclusion: June 14, 2023 spanning"),  # reaches across the column gap
    ]
    grid = table_grid(lines, row_rules=(95, 150, 190, 220))
    assert [[cell.text for cell in row] for row in grid] == [
        ["7c", "Electrical and electronic components with lead"],
        ["15", "Lead in solders"],
        ["Date of Inclusion: June 14, 2023 spanning"],
    ]
    assert grid[2][0].span == 2
    assert "<lcel>" in to_otsl(grid)
    assert 'colspan="2"' in convert_otsl_to_html(to_otsl(grid))


def test_a_table_block_renders_as_a_markdown_table_in_the_page() -> None:
    region = Visual(90, 95, 700, 170, VisualKind.TABLE)
    blocks = build_page([*table_lines(), *paragraph(100, 300, "body", 3)], height=PAGE_H, visuals=[region])
    assert blocks[0].type is BlockType.TABLE
    assert blocks_to_markdown(blocks).startswith("| Country | Population | Capital |\n|---|---|---|")


def _page_image(width: int = 1000, height: int = 1400) -> np.ndarray:
    return np.full((height, width, 3), 255, np.uint8)


def _draw_text(image: np.ndarray, lines: list[OcrLine]) -> None:
    """Glyph-like ink inside each line box: short vertical strokes, as text looks to a mask."""
    for item in lines:
        for x in range(int(item.x1), int(item.x2) - 2, 6):
            image[int(item.y1) + 3 : int(item.y2) - 3, x : x + 2] = 0


def test_regions_find_a_plot_with_its_labels_but_not_its_caption() -> None:
    import cv2

    image = _page_image()
    body = paragraph(100, 100, "body", 6, chars=100)
    caption = [line(100, 700, "Figure 1: the response of the detector to the sample, measured twice.")]
    labels = [line(155, 300 + 40 * i, f"{i}000", advance=9.0) for i in range(5)]  # tick labels by the axis
    _draw_text(image, [*body, *caption, *labels])
    cv2.rectangle(image, (200, 280), (800, 660), (0, 0, 0), 2)  # the plot's frame
    xs = np.arange(210, 790)
    curve = np.stack([xs, 470 + 120 * np.sin(xs / 40.0)], axis=1).astype(np.int32)
    cv2.polylines(image, [curve], False, (0, 0, 255), 2)
    regions = find_regions(image, [*body, *caption, *labels])
    images = [visual for visual in regions.visuals if visual.kind is VisualKind.IMAGE]
    assert len(images) == 1
    figure = images[0]
    assert figure.x1 <= 155 and figure.x2 >= 800 and figure.y1 <= 280 and figure.y2 >= 660  # frame and labels
    assert figure.y2 < caption[0].y1  # the caption stays text
    blocks = build_page([*body, *caption, *labels], height=1400, visuals=regions.visuals)
    assert [block.type for block in blocks] == [BlockType.TEXT, BlockType.IMAGE, BlockType.TEXT]


def test_a_caption_whose_second_row_is_detected_in_pieces_stays_text() -> None:
    """zfn-chemistry-2p page 2 on MinerU's 1036x1036 layout image: the caption's second row comes back from
    the detector as two short pieces, each short enough to pass for a label; taking them pulled the whole
    caption into the figure's crop."""
    import cv2

    image = _page_image()
    caption = [
        line(200, 666, "Fig. 1. A kink-typed solitary wave with the parameters mu=1,"),  # close under the plot
        line(200, 689, "y=1, q=1, C=1, r=-1,"),
        line(370, 689, "and G=sqrt(-18r+12)/30."),
    ]
    labels = [line(160, 300 + 60 * i, f"{i}00", advance=9.0) for i in range(5)]
    body = [*paragraph(100, 100, "body", 6, chars=100), *paragraph(100, 760, "after", 6, chars=100)]
    _draw_text(image, [*body, *caption, *labels])
    cv2.rectangle(image, (200, 280), (800, 660), (0, 0, 0), 2)
    xs = np.arange(210, 790)
    curve = np.stack([xs, 470 + 120 * np.sin(xs / 40.0)], axis=1).astype(np.int32)
    cv2.polylines(image, [curve], False, (0, 0, 0), 2)

    (figure,) = [v for v in find_regions(image, [*body, *caption, *labels]).visuals if v.kind is VisualKind.IMAGE]

    assert figure.x1 <= 160 and figure.y2 >= 660
    assert figure.y2 < caption[0].y1


def test_a_figure_in_one_column_takes_no_labels_from_the_other_column() -> None:
    """zfn-chemistry-2p page 2: a plot in the right column, beside the left column's equation numbers,
    under the running head and page number.

    The numbers are short lines close to the plot's tick labels, but across the column gutter: they are
    the left column's text, not the figure's, and must neither be cropped with it nor lost from the text.
    The running head and the page number, on the page's first row just above the plot, are not its labels.
    """
    import cv2

    image = _page_image()
    left = paragraph(60, 100, "left", 24, chars=48)  # x 60..444
    numbers = [line(410, 170 + 96 * i, f"({11 + i})") for i in range(4)]  # right-aligned in the left column
    right_text = paragraph(530, 700, "right", 16, chars=50)  # x 530..930, under the figure
    ticks = [line(470, 150 + 60 * i, f"{i}.5", advance=9.0) for i in range(5)]  # y-axis labels, left of the plot
    furniture = [line(480, 100, "Notes"), line(900, 100, "273")]  # the page's first row, 20 px above the plot
    _draw_text(image, [*left, *numbers, *right_text, *ticks, *furniture])
    cv2.rectangle(image, (510, 140), (930, 460), (0, 0, 0), 2)  # the plot's frame
    xs = np.arange(520, 920)
    curve = np.stack([xs, 300 + 100 * np.sin(xs / 30.0)], axis=1).astype(np.int32)
    cv2.polylines(image, [curve], False, (0, 0, 0), 3)
    lines = [*left, *numbers, *right_text, *ticks, *furniture]

    (figure,) = [v for v in find_regions(image, lines).visuals if v.kind is VisualKind.IMAGE]

    assert figure.x1 <= 470 and figure.x2 >= 930  # the plot and its tick labels
    assert figure.x1 > max(number.x2 for number in numbers) - 5  # none of the left column's numbers
    assert figure.y1 > 130  # nor the running head
    blocks = build_page(lines, height=1400, visuals=[figure])
    text = "\n".join(block.text for block in blocks)
    assert all(number.text in text for number in numbers)


def test_a_displayed_formula_with_tall_brackets_is_not_a_figure() -> None:
    """zfn-chemistry-2p page 2: a formula over two rows inside tall round brackets, with small super- and
    subscripts the text detector boxes with no line. That ink smears into one large region, but a third of
    it is text lines (a plot's labels cover a few per cent, a boxed flow chart about a quarter): a formula,
    which must stay text rather than be cropped as a picture."""
    import cv2

    image = _page_image()
    rows = [line(110, 610 + 60 * i, "ab+cd-ef=gh+ij-kl+mn-o", advance=13.0) for i in range(2)]
    _draw_text(image, rows)
    for y in range(590, 720, 14):  # the scripts no line holds
        for x in range(110, 400, 14):
            image[y : y + 4, x : x + 4] = 0
    cv2.ellipse(image, (150, 655), (55, 75), 0, 120, 240, (0, 0, 0), 2)  # tall round brackets
    cv2.ellipse(image, (360, 655), (55, 75), 0, -60, 60, (0, 0, 0), 2)
    body = paragraph(100, 100, "body", 12, chars=60)
    _draw_text(image, body)
    regions = find_regions(image, [*body, *rows])
    assert not [v for v in regions.visuals if v.kind is VisualKind.IMAGE]


def test_two_alike_fraction_bars_are_not_a_booktabs_table_but_a_header_bar_and_a_rule_are() -> None:
    """zfn-chemistry-2p page 2 sets one fraction twice, one under the other: two thin rules of the same
    width with rows of text between them look like a booktabs table with no header rule. A booktabs table
    has three rules (top, header, bottom); sci-tables-6p page 6 has a one-row table under a filled header
    bar, closed by one rule, and that one stays a table."""
    import cv2

    image = _page_image()
    formula = [
        line(120, 560, "(3Gu2r2+300G3uy2r)t"),
        line(200, 600, "5y2r"),
        line(100, 640, "-6 y csgn(G) G2"),
        line(330, 640, "tanh2"),
        line(120, 680, "(3Gu2r2+300G3uy2r)t"),
        line(200, 720, "5y2r"),
    ]
    for y in (590, 710):  # the two fraction bars
        cv2.line(image, (110, y), (440, y), (0, 0, 0), 2)
    table = [line(110, 1010, "Substance"), line(420, 1010, "Where used"), line(110, 1045, "Bisphenol A")]
    table.append(line(420, 1045, "Laminate"))
    cv2.rectangle(image, (100, 1000), (700, 1035), (90, 60, 30), -1)  # a filled header bar
    cv2.line(image, (100, 1072), (700, 1072), (0, 0, 0), 1)  # and the rule under the only row
    body = paragraph(100, 100, "body", 12, chars=60)
    _draw_text(image, [*formula, *body, table[2], table[3]])

    regions = find_regions(image, [*body, *formula, *table])

    tables = [v for v in regions.visuals if v.kind is VisualKind.TABLE]
    assert len(tables) == 1 and tables[0].y1 >= 990, tables


def test_regions_find_ruled_and_booktabs_tables_and_free_rules() -> None:
    import cv2

    image = _page_image()
    grid_lines = table_lines(top=112)
    booktabs = table_lines(top=612)
    _draw_text(image, [*grid_lines, *booktabs])
    for y in (100, 136, 160, 184):  # a grid: rows and columns ruled, in light grey
        cv2.line(image, (90, y), (700, y), (210, 210, 210), 1)
    for x in (90, 290, 510, 700):
        cv2.line(image, (x, 100), (x, 184), (210, 210, 210), 1)
    for y in (600, 636, 686):  # booktabs: top, mid and bottom rules only
        cv2.line(image, (90, y), (700, y), (0, 0, 0), 2)
    cv2.line(image, (100, 1000), (900, 1000), (0, 0, 0), 1)  # a lone separator
    regions = find_regions(image, [*grid_lines, *booktabs])
    tables = sorted((v for v in regions.visuals if v.kind is VisualKind.TABLE), key=lambda v: v.y1)
    assert len(tables) == 2
    assert tables[0].y1 <= 100 and tables[0].y2 >= 184 and len(tables[0].column_rules) == 2
    assert tables[1].y1 <= 600 and tables[1].y2 >= 686
    assert [round(rule.cy) for rule in regions.rules] == [1000]
    assert not any(visual.kind is VisualKind.IMAGE for visual in regions.visuals)
    crop = image[95:190, 85:705]
    rows, columns = table_rules(crop)
    assert len(columns) == 2 and len(rows) >= 4


# --------------------------------------------------------------------------- MinerU's layout format


def test_layout_output_parses_back_with_mineru_to_the_same_boxes_and_types() -> None:
    width, height = 1036, 1036

    def block(kind: BlockType, *boxes: tuple[float, float, float, float], level: int = 0) -> Block:
        return Block(kind, [Row([OcrLine(*box, "x")]) for box in boxes], level=level)

    blocks = [
        block(BlockType.HEADER, (100, 10, 400, 30)),
        block(BlockType.DOC_TITLE, (100, 50, 900, 90), level=1),
        block(BlockType.PARAGRAPH_TITLE, (100, 100, 500, 115), level=2),
        block(BlockType.TEXT, (100, 120, 900, 140), (100, 144, 880, 164)),
        Block(BlockType.IMAGE, region=Visual(100, 200, 600, 500)),
        Block(BlockType.TABLE, region=Visual(100, 520, 900, 700, VisualKind.TABLE)),
        block(BlockType.ASIDE_TEXT, (10, 300, 30, 700)),
        block(BlockType.FOOTER, (100, 980, 400, 1000)),
        block(BlockType.PAGE_NUMBER, (500, 1000, 520, 1020)),
    ]
    output = format_layout(blocks, width, height)
    parsed = mineru_layout_parser().parse_layout_output(output)
    assert [item.type for item in parsed] == [block.type.value for block in blocks]
    for original, back in zip(blocks, parsed, strict=True):
        expected = [original.x1 / width, original.y1 / height, original.x2 / width, original.y2 / height]
        assert back.bbox == pytest.approx(expected, abs=0.0011)
        assert back.angle == 0


def test_layout_padding_grows_text_boxes_but_not_into_the_next_block_nor_figures() -> None:
    upper = Block(BlockType.TEXT, [Row([OcrLine(100, 100, 900, 130, "upper")])])
    lower = Block(BlockType.TEXT, [Row([OcrLine(100, 128, 900, 160, "lower")])])  # detection boxes overlap
    figure = Block(BlockType.IMAGE, region=Visual(100, 300, 900, 600))
    output = format_layout([upper, lower, figure], 1000, 1000, pad_x=5, pad_y=5)
    parsed = mineru_layout_parser().parse_layout_output(output)
    assert parsed[0].bbox[0] == pytest.approx(0.095)  # padded sideways
    assert parsed[0].bbox[1] == pytest.approx(0.095)  # and upwards, where nothing is
    assert parsed[0].bbox[3] <= parsed[1].bbox[1]  # but the two crops do not overlap
    assert parsed[2].bbox == pytest.approx([0.1, 0.3, 0.9, 0.6])  # a figure keeps its own region


def test_layout_boxes_never_collapse_and_an_empty_page_is_empty() -> None:
    edge = Block(BlockType.TEXT, [Row([OcrLine(999.8, 10, 1000, 10.2, ".")])])
    assert len(mineru_layout_parser().parse_layout_output(format_layout([edge], 1000, 1000))) == 1
    assert format_layout([], 1036, 1036) == ""


# --------------------------------------------------------------------------- OCR line clean-up (ocr.py, no model)


def test_a_box_reaching_into_the_gutter_loses_its_neighbours_sliver() -> None:
    from mkg_devstack.local_server.ocr import _plausible, _split_at_gaps

    gray = np.full((60, 400), 255, np.uint8)
    gray[20:40, 100:104] = 0  # the last glyph's edge of the left column's line, inside the box
    for word in range(130, 370, 36):  # the right column's line after a 26 px gutter: words with 8 px spaces
        for x in range(word, word + 28, 7):
            gray[20:40, x : x + 5] = 0
    box = np.array([[100, 18], [380, 18], [380, 42], [100, 42]], np.float32)
    pieces = _split_at_gaps(gray, box, gutter=117.0, tolerance=10.0)
    assert len(pieces) == 1 and pieces[0][:, 0].min() >= 126  # the sliver is gone, the line starts at its text
    # Text read into a box too narrow to hold it is noise ("N" in 2 px), a real digit is not.
    assert not _plausible(np.array([[0, 0], [2, 0], [2, 20], [0, 20]], np.float32), "N", False)
    assert _plausible(np.array([[0, 0], [9, 0], [9, 20], [0, 20]], np.float32), "1", False)
