"""The repetition detector (engines/validation.py): fires on decoding loops, never on real text."""

from __future__ import annotations

import pymupdf
import pytest

from mkg_pipeline.engines.validation import MIN_RUN_CHARS, find_repetition
from mkg_pipeline_tests.fixtures.corpus import corpus_manifest, corpus_pdf

TABLE_HEADER = "| Patient | Dose | Day 1 | Day 2 | Day 3 |\n|---|---|---|---|---|\n"


@pytest.mark.parametrize(
    "loop",
    [
        pytest.param("Introduction. " + "the " * 600, id="word"),
        pytest.param("# Results\n\n" + "We measured the dose again.\n" * 100, id="sentence-lines"),
        pytest.param(TABLE_HEADER + "| 0 | 0 | 0 | 0 | 0 |\n" * 150, id="table-row-forever"),
        pytest.param("结果表明" * 10 + "患者的剂量" * 500, id="cjk-no-spaces"),
        pytest.param("Text " + "-" * 3000, id="one-character"),
        pytest.param(
            "Intro " + ("A long paragraph that repeats itself word for word, " * 4 + "\n\n") * 12, id="paragraph"
        ),
    ],
)
def test_loops_are_found(loop: str) -> None:
    found = find_repetition(loop)
    assert found is not None and found.run_chars >= MIN_RUN_CHARS and found.repeats >= 10


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            TABLE_HEADER + "| 0 | 0 | 0 | 0 | 0 |\n" * 60 + "| Total | 0 | 0 | 0 | 0 |\n", id="zeros-then-total"
        ),
        pytest.param(
            TABLE_HEADER + "".join(f"| P{i} | 10 mg | + | + | + |\n" for i in range(120)), id="repeated-cells"
        ),
        pytest.param(
            "Contents\n" + "".join(f"{i}. Chapter {i} " + "." * 40 + f" {i * 7}\n" for i in range(60)), id="toc"
        ),
        pytest.param("short " * 200, id="below-min-run"),
    ],
)
def test_real_looking_text_with_repetition_is_not_a_loop(text: str) -> None:
    assert find_repetition(text) is None


def test_no_corpus_page_text_is_a_loop() -> None:
    """The text layer of every page of every readable corpus PDF, page by page and whole documents."""
    checked = 0
    for name, entry in sorted(corpus_manifest().items()):
        if entry["expect"] != "ok" or not entry.get("text_layer_chars"):
            continue
        with pymupdf.open(corpus_pdf(name)) as document:
            texts = [page.get_text() for page in document]
        for number, text in enumerate(texts, start=1):
            assert find_repetition(text) is None, f"{name} page {number}"
        assert find_repetition("\n".join(texts)) is None, name
        checked += len(texts)
    assert checked > 150
