"""Text similarity for quality checks: normalised text compared with rapidfuzz.

Kept tiny and import-light (stdlib + rapidfuzz) so tests, benchmarks and
asset checks can all use the same measure.
"""

from __future__ import annotations

import re
import unicodedata

_HEADING_MARKS = re.compile(r"(?m)^[ \t]*#{1,6}[ \t]+")


def normalise_text(text: str) -> str:
    """NFKC, lowercase, Markdown heading marks stripped, whitespace collapsed to single spaces."""
    text = unicodedata.normalize("NFKC", text)
    text = _HEADING_MARKS.sub("", text)
    return " ".join(text.lower().split())


def similarity(a: str, b: str) -> float:
    """rapidfuzz ``fuzz.ratio`` of the normalised texts, in 0..1 (1.0 for two empty texts)."""
    from rapidfuzz import fuzz

    return fuzz.ratio(normalise_text(a), normalise_text(b)) / 100.0
