"""The local server's olmOCR-2 answer format and its rotation geometry (pure parts, no OCR model)."""

from __future__ import annotations

import numpy as np
import pytest

from mkg_devstack.local_server.answers import _turn_line
from mkg_devstack.local_server.geometry import OcrLine
from mkg_devstack.local_server.olmocr_format import (
    OlmOcrPage,
    covered_share,
    figure_label,
    format_answer,
    primary_language,
    table_html,
)
from mkg_devstack.local_server.protocol import Route, route_for_prompt
from mkg_devstack.local_server.tables import Cell
from mkg_pipeline.engines.olmocr import FrontMatter, parse_answer
from mkg_pipeline.engines.prompts import OLMOCR_PROMPT, PAGE_MARKDOWN_PROMPT


def test_olmocrs_prompt_has_its_own_route() -> None:
    assert route_for_prompt(OLMOCR_PROMPT) is Route.OLMOCR
    assert route_for_prompt(PAGE_MARKDOWN_PROMPT) is Route.PAGE_MARKDOWN


def test_the_answer_is_what_the_engine_parses() -> None:
    page = OlmOcrPage("# T\n\nBody.", primary_language="en", rotation_correction=90, is_table=True)
    answer = format_answer(page)
    assert answer.startswith("---\nprimary_language: en\nis_rotation_valid: False\nrotation_correction: 90\n")
    assert parse_answer(answer) == (FrontMatter("en", False, 90, True, False), "# T\n\nBody.")
    blank = format_answer(OlmOcrPage(""))
    assert parse_answer(blank) == (FrontMatter(None, True, 0, False, False), "")


def test_primary_language_from_the_script() -> None:
    assert primary_language("The cat sat.") == "en"
    assert primary_language("مرحبا بالعالم and a word") == "ar"
    assert primary_language("1 2 3 --") is None


def test_tables_are_html_with_a_header_row_and_spans() -> None:
    grid = [[Cell("a", 0), Cell("b<c", 1)], [Cell("wide", 0, span=2)], [Cell("x", 1)]]
    assert table_html(grid) == (
        '<table><tr><th>a</th><th>b&lt;c</th></tr><tr><td colspan="2">wide</td></tr>'
        "<tr><td></td><td>x</td></tr></table>"
    )
    assert table_html([]) == ""


def test_figure_label_is_olmocrs_pixel_name() -> None:
    assert figure_label(10.4, 20.6, 110.4, 70.6) == "![Figure](page_10_21_100_50.png)"


def test_covered_share() -> None:
    assert covered_share([(0, 0, 50, 100)], 100, 100) == pytest.approx(0.5, abs=0.02)
    assert covered_share([(0, 0, 50, 100), (0, 0, 50, 100)], 100, 100) == pytest.approx(0.5, abs=0.02)
    assert covered_share([], 100, 100) == 0.0


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_a_turned_line_box_covers_the_same_pixels_as_np_rot90(k: int) -> None:
    image = np.zeros((40, 60), dtype=np.uint8)  # 60 wide, 40 high
    image[5:15, 10:30] = 1
    line = OcrLine(10, 5, 30, 15, vertical=True)
    turned = np.rot90(image, k)
    box = _turn_line(line, k, 60, 40)
    ys, xs = np.nonzero(turned)
    assert (box.x1, box.y1, box.x2, box.y2) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert not box.vertical
