"""MinerU's content-list schema (outputs.CONTENT_LIST_SCHEMA) and the page_markdown engine's content list."""

from __future__ import annotations

import jsonschema
import pytest

from mkg_pipeline.document import assemble_document
from mkg_pipeline.engines.content_list import blocks_to_page
from mkg_pipeline.engines.page_markdown import markdown_to_content_list
from mkg_pipeline.engines.page_safety import CONTENT_LIST_SCHEMA

SHA = "0" * 64
PAGE = """# Dosing of drug X

First paragraph
continues here with \\(x\\) inline math.

## Results

- first item
- second item
  over two lines

| Dose | Effect |
|---|---|
| 10 mg | **none** |

$$
E = m c^2
$$

<table><tr><td colspan="2" onclick="x">HTML table</td></tr></table>

```python
print("code")
```

<div>Some <b>raw</b> html</div>

Last paragraph."""


def test_page_markdown_answer_becomes_mineru_items() -> None:
    items = markdown_to_content_list(PAGE, page_idx=2)
    jsonschema.validate(items, CONTENT_LIST_SCHEMA)
    assert items == [
        {"type": "text", "text": "Dosing of drug X", "text_level": 1, "page_idx": 2},
        {"type": "text", "text": "First paragraph\ncontinues here with \\(x\\) inline math.", "page_idx": 2},
        {"type": "text", "text": "Results", "text_level": 2, "page_idx": 2},
        {"type": "text", "text": "- first item", "page_idx": 2},
        {"type": "text", "text": "- second item\n  over two lines", "page_idx": 2},
        {
            "type": "table",
            "table_body": "<table><thead><tr><th>Dose</th><th>Effect</th></tr></thead>"
            "<tbody><tr><td>10 mg</td><td><strong>none</strong></td></tr></tbody></table>",
            "table_caption": [],
            "table_footnote": [],
            "page_idx": 2,
        },
        {"type": "equation", "text": "$$\nE = m c^2\n$$", "text_format": "latex", "page_idx": 2},
        {
            "type": "table",
            "table_body": '<table><tr><td colspan="2">HTML table</td></tr></table>',
            "table_caption": [],
            "table_footnote": [],
            "page_idx": 2,
        },
        {"type": "code", "sub_type": "code", "code_body": 'print("code")', "code_caption": [], "page_idx": 2},
        {"type": "text", "text": "Some raw html", "page_idx": 2},
        {"type": "text", "text": "Last paragraph.", "page_idx": 2},
    ]


def test_figure_without_a_crop_is_left_out_and_unclaimed_captions_stay_text() -> None:
    blocks = [
        {"type": "image", "bbox": [0.1, 0.1, 0.5, 0.5], "content": None},
        {"type": "image_caption", "bbox": [0.1, 0.55, 0.5, 0.6], "content": "Figure 9: its image is too small"},
        {"type": "text", "bbox": [0.1, 0.6, 0.9, 0.7], "content": "First half of a sentence"},
        {"type": "text", "bbox": [0.1, 0.7, 0.9, 0.8], "content": "and its second half.", "merge_prev": True},
        {"type": "list", "bbox": [0.1, 0.8, 0.9, 0.9], "content": None},
        {"type": "table", "bbox": [0.1, 0.9, 0.9, 0.95], "content": "not OTSL, not HTML"},
    ]
    markdown, items = blocks_to_page(blocks, 0, crops={5: f"images/{SHA}.jpg"})  # no crop for the image
    jsonschema.validate(items, CONTENT_LIST_SCHEMA)
    assert [i["type"] for i in items] == ["text", "text", "table", "text"]
    assert items[0]["text"] == "Figure 9: its image is too small"
    assert items[1]["text"] == "First half of a sentence and its second half."
    assert items[2]["table_body"] == "" and items[2]["img_path"] == f"images/{SHA}.jpg"
    assert items[3]["text"] == "not OTSL, not HTML"  # what the model said is kept
    assert f"![](images/{SHA}.jpg)" in markdown  # MinerU links the table crop when there is no HTML


def _owners(blocks: list[dict], crops: dict[int, str]) -> list[list[str]]:
    _, items = blocks_to_page(blocks, 0, crops)
    return [i.get("image_caption", i.get("table_caption")) for i in items if i["type"] in {"image", "table"}]


def test_captions_prefer_the_conventional_side_unless_the_other_is_clearly_closer() -> None:
    """A figure's caption sits below the figure, a table's above the table: a caption between two
    figures (or tables) goes to that side when it is at most twice as far as the other (before the
    fix: to the nearer one); a caption clearly nearer the other side (a journal that puts figure
    captions on top) still goes there."""
    figures = [
        {"type": "image", "bbox": [0.1, 0.10, 0.5, 0.30]},
        {"type": "image_caption", "bbox": [0.1, 0.317, 0.5, 0.34], "content": "Figure 1: above is mine"},
        {"type": "image", "bbox": [0.1, 0.352, 0.5, 0.55]},  # 0.012 below, 0.017 above
    ]
    assert _owners(figures, {0: f"images/{SHA}.jpg", 2: f"images/{'1' * 64}.jpg"}) == [
        ["Figure 1: above is mine"],
        [],
    ]
    tables = [
        {"type": "table", "bbox": [0.1, 0.10, 0.5, 0.30], "content": "<table><tr><td>a</td></tr></table>"},
        {"type": "table_caption", "bbox": [0.1, 0.31, 0.5, 0.33], "content": "Table 2: below is mine"},
        {"type": "table", "bbox": [0.1, 0.345, 0.5, 0.55], "content": "<table><tr><td>b</td></tr></table>"},
    ]
    assert _owners(tables, {}) == [[], ["Table 2: below is mine"]]
    captions_on_top = [
        {"type": "image", "bbox": [0.1, 0.10, 0.5, 0.30]},
        {"type": "image_caption", "bbox": [0.1, 0.33, 0.5, 0.35], "content": "Figure 2: below is mine"},
        {"type": "image", "bbox": [0.1, 0.355, 0.5, 0.55]},  # 0.005 below, 0.03 above
    ]
    assert _owners(captions_on_top, {0: f"images/{SHA}.jpg", 2: f"images/{'1' * 64}.jpg"}) == [
        [],
        ["Figure 2: below is mine"],
    ]


@pytest.mark.parametrize(
    "item",
    [
        {"type": "image", "page_idx": 0, "image_caption": [], "image_footnote": []},  # no img_path
        {"type": "image", "page_idx": 0, "img_path": "../x.jpg", "image_caption": [], "image_footnote": []},
        {"type": "text", "page_idx": 0, "text": "x", "bbox": [0, 0, 1001, 10]},
        {"type": "text", "page_idx": -1, "text": "x"},
        {"type": "table", "page_idx": 0, "table_body": "", "table_caption": [], "table_footnote": [], "text_level": 1},
        {"type": "text", "page_idx": 0, "text": "x", "blocks": []},  # not a content-list field
        {"type": "figure", "page_idx": 0},
    ],
)
def test_schema_rejects_what_mineru_would_not_write(item: dict) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([item], CONTENT_LIST_SCHEMA)


def test_assembled_content_list_validates() -> None:
    _, items = assemble_document(
        [
            {"page": 1, "markdown": PAGE, "content_list": markdown_to_content_list(PAGE, 0)},
            {"page": 2, "reason": "empty"},
            {"page": 3, "markdown": "x", "blocks": [{"type": "text", "text": "x", "bbox": None}]},
        ]
    )
    jsonschema.validate(items, CONTENT_LIST_SCHEMA)
    assert {i["page_idx"] for i in items} == {0, 2}
