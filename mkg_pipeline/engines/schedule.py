"""olmOCR's re-ask temperature schedule, shared by every VLM engine.

olmOCR (olmocr/pipeline.py ``TEMPERATURE_BY_ATTEMPT``) sends attempt *n* (0-based) of a page at the
*n*-th temperature: a first answer close to greedy, then more and more sampling, because an answer
that failed (a loop cut off at ``max_tokens``, a non-``stop`` finish, an empty page) is most often
the greedy decode stuck in a rut that a higher temperature breaks out of. The last temperature
repeats past the end of the table.

The olmocr engine sends every attempt at :func:`temperature_for`. page_markdown and mineru send
their first ask at their own temperature (greedy for page_markdown; MinerU's per-step sampling
parameters), so a page's first answer, the one almost every page keeps and the cache holds, does
not change; their re-ask *n* (1-based) is sent at ``temperature_for(n)``: 0.1, 0.2, 0.3, 0.5, ...
"""

from __future__ import annotations

#: olmocr/pipeline.py TEMPERATURE_BY_ATTEMPT: attempt n is sent at the n-th (the last one repeats)
OLMOCR_TEMPERATURES: tuple[float, ...] = (0.1, 0.1, 0.2, 0.3, 0.5, 0.8, 0.9, 1.0)


def temperature_for(attempt: int) -> float:
    """olmOCR's temperature for 0-based ``attempt`` (the last one repeats)."""
    return OLMOCR_TEMPERATURES[min(max(attempt, 0), len(OLMOCR_TEMPERATURES) - 1)]


def reask_temperature(ask: int, first: float) -> float:
    """The temperature of 1-based ``ask`` for an engine whose first ask is sent at ``first``."""
    return first if ask <= 1 else temperature_for(ask - 1)
