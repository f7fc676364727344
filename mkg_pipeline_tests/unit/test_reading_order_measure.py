"""The reading-order measure itself (fixtures/reading_order.py), on synthetic text: no PDF, no OCR."""

from __future__ import annotations

from mkg_pipeline_tests.fixtures.reading_order import (
    LayerLine,
    column_order_agreement,
    longest_increasing,
)

LEFT = [f"left column line number {n} says something about {word}" for n, word in enumerate("abcdefghij")]
RIGHT = [f"right column line number {n} talks about {word} instead" for n, word in enumerate("klmnopqrst")]
LAYER = [LayerLine(text, "left", float(n)) for n, text in enumerate(LEFT)] + [
    LayerLine(text, "right", float(n)) for n, text in enumerate(RIGHT)
]


def test_longest_increasing_subsequence() -> None:
    assert longest_increasing([]) == 0
    assert longest_increasing([3, 1, 2, 5, 4, 6]) == 4
    assert longest_increasing([5, 4, 3]) == 1


def test_column_by_column_reading_agrees_fully() -> None:
    agreement = column_order_agreement("\n".join(LEFT + RIGHT), LAYER)
    assert agreement.share == 1.0 and agreement.lost == 0
    assert agreement.column_share("left") == agreement.column_share("right") == 1.0


def test_reading_across_both_columns_line_by_line_scores_about_half() -> None:
    across = "\n".join(f"{left} {right}" for left, right in zip(LEFT, RIGHT, strict=True))
    agreement = column_order_agreement(across, LAYER)
    assert agreement.lost == 0
    assert agreement.share <= 0.6
    # Each column on its own is still top to bottom: only the overall measure sees the interleaving.
    assert agreement.column_share("left") == 1.0


def test_right_column_first_and_shuffled_column_are_caught() -> None:
    assert column_order_agreement("\n".join(RIGHT + LEFT), LAYER).share <= 0.6
    shuffled = "\n".join(LEFT[5:] + LEFT[:5] + RIGHT)
    agreement = column_order_agreement(shuffled, LAYER)
    assert agreement.column_share("left") <= 0.6
    assert agreement.column_share("right") == 1.0


def test_missing_text_counts_as_lost_and_out_of_order() -> None:
    agreement = column_order_agreement("\n".join(LEFT), LAYER)
    assert agreement.lost == len(RIGHT)
    assert agreement.share == 0.5
    assert agreement.column_share("right") == 1.0  # nothing read, nothing out of order: `lost` says it
