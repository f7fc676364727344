"""When an answer that arrived fine is still not a page: another model, not finished, empty, or a loop.

olmOCR's idea: bad *output* is retried like a transport error, instead of being cached as done.
Only an answer from the configured model (or one of ``vllm.served_model_aliases``) whose
``finish_reason`` is ``"stop"`` can become a page. The reasons, checked in this order:

``model_mismatch``
    The answer's ``model`` is not the configured model nor one of its aliases, or the answer names no
    model. Compared exactly (no case folding, no trimming): vLLM's served names are exact strings, and an
    answer cached under the configured model's key must be that model's. Checked first: another
    model's answer says nothing about this one's.
``truncated``
    ``finish_reason == "length"``: the model was cut off at ``max_tokens``; the end of the page is missing.
``finish_<reason>``
    Any other ``finish_reason`` but ``"stop"`` (compared exactly): ``finish_content_filter`` (a filter
    withheld all or part of the answer), ``finish_abort`` (vLLM aborted the request: the text stops
    wherever it was), ``finish_tool_calls`` / ``finish_function_call`` (the model called a tool
    instead of answering), ``finish_error``; ``finish_missing`` when the answer has none (null,
    absent or empty), and ``finish_unknown`` for any other string. The set is closed, so a server's
    invention never becomes a metric label; the detail quotes what the server said.
``empty``
    Nothing but whitespace, on a page whose PDF text layer has text (``text_layer_chars > 0``).
``repetition``
    A runaway loop at the end of the answer, found by :func:`find_repetition`.
``front_matter``
    An engine whose model answers in a fixed format (olmOCR's YAML front matter) got an answer that is
    not in it: missing, unparsable or with a wrong field (``engines.olmocr``).

The repetition detector
-----------------------
A decoding loop repeats one unit (a word, a line, a table row, a sentence) until the model stops
or runs out of tokens, so it shows as a *periodic suffix*: the end of the answer equals itself
shifted by the unit's length. :func:`find_repetition` collapses whitespace, then for each period
``p`` of 1..``max_period`` characters measures how far back from the end ``text[i] == text[i - p]``
holds. It reports a loop when that periodic tail

- is at least ``min_run_chars`` long (2,000 characters: about 500 tokens of nothing new), and
- holds at least ``min_repeats`` copies of the unit (10).

Real text does not do that. A table with repeated cells repeats a row a few times and then
changes (a total, a label, the next section), and its periodic tail is far shorter than 2,000
characters; dot leaders and rules are a few dozen characters. The corpus test runs the detector
over the text layer of every corpus page and over tables with repeated cells, and it fires on none.
Loops that reach ``max_tokens`` are also ``truncated``; the detector catches those that the
model (or a server-side limit) ended with ``stop``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: the one finish reason of a finished answer
FINISHED = "stop"
#: the reason a page fails with, per finish_reason the server may give (anything else: ``finish_unknown``)
FINISH_REASONS: dict[str, str] = {
    "length": "truncated",
    "content_filter": "finish_content_filter",
    "abort": "finish_abort",
    "tool_calls": "finish_tool_calls",
    "function_call": "finish_function_call",
    "error": "finish_error",
}
FINISH_MISSING = "finish_missing"
FINISH_UNKNOWN = "finish_unknown"
MODEL_MISMATCH = "model_mismatch"
#: Why an answer that arrived fine over HTTP is still not a page result (``AnswerRejected.reason``).
REJECT_REASONS: tuple[str, ...] = (
    MODEL_MISMATCH,
    *FINISH_REASONS.values(),
    FINISH_MISSING,
    FINISH_UNKNOWN,
    "empty",
    "repetition",
    "front_matter",
)

MIN_RUN_CHARS = 2000
MIN_REPEATS = 10
MAX_PERIOD = 500
#: only this much of the end of an answer is examined (a loop long enough to matter reaches it)
TAIL_CHARS = 20_000


@dataclass(frozen=True)
class Repetition:
    """A periodic tail: ``unit`` repeated ``repeats`` times over the last ``run_chars`` characters."""

    unit: str
    repeats: float
    run_chars: int

    def describe(self) -> str:
        shown = self.unit if len(self.unit) <= 60 else self.unit[:57] + "..."
        return f"{self.repeats:.0f} repeats of {shown!r} over the last {self.run_chars} characters"


def find_repetition(
    text: str,
    *,
    min_run_chars: int = MIN_RUN_CHARS,
    min_repeats: int = MIN_REPEATS,
    max_period: int = MAX_PERIOD,
) -> Repetition | None:
    """The runaway repetition at the end of ``text``, or None (see the module docstring)."""
    tail = re.sub(r"\s+", " ", text[-TAIL_CHARS:]).rstrip()
    n = len(tail)
    if n < min_run_chars:
        return None
    for period in range(1, min(max_period, n // min_repeats) + 1):
        # Cheap rejection first: most periods fail on the last characters.
        if tail[-1] != tail[-1 - period]:
            continue
        matched = 0
        i = n - 1
        while i - period >= 0 and tail[i] == tail[i - period]:
            matched += 1
            i -= 1
        run = matched + period
        if run >= min_run_chars and run >= min_repeats * period:
            return Repetition(unit=tail[n - period :], repeats=run / period, run_chars=run)
    return None


def _shown(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def model_problem(model: str | None, accepted_models: Collection[str]) -> tuple[str, str] | None:
    """(``model_mismatch``, detail) unless ``model`` is exactly one of ``accepted_models``."""
    if model is not None and model in accepted_models:
        return None
    expected = " or ".join(repr(name) for name in sorted(accepted_models))
    said = "an answer that names no model" if model is None else f"an answer from model {_shown(model)}"
    return MODEL_MISMATCH, f"{said}, not from {expected}"


def finish_problem(finish_reason: str | None, text: str) -> tuple[str, str] | None:
    """(reason, detail) unless ``finish_reason`` is exactly ``"stop"``."""
    if finish_reason == FINISHED:
        return None
    if finish_reason == "length":
        return "truncated", f"answer cut off at max_tokens (finish_reason 'length') after {len(text)} characters"
    if not finish_reason:
        return FINISH_MISSING, f"answer without a finish_reason ({_shown(finish_reason)}) after {len(text)} characters"
    reason = FINISH_REASONS.get(finish_reason, FINISH_UNKNOWN)
    return reason, f"answer ended with finish_reason {_shown(finish_reason)}, not 'stop', after {len(text)} characters"


def answer_problem(
    text: str,
    finish_reason: str | None,
    *,
    model: str | None,
    accepted_models: Collection[str],
    require_text: bool,
) -> tuple[str, str] | None:
    """(reason, detail) when an answer must not become a page result, else None (module docstring).

    ``model`` is the answer's ``model`` field (None if absent), ``accepted_models`` the configured model
    and its aliases (``VLLMClient.accepted_models``).
    """
    problem = model_problem(model, accepted_models) or finish_problem(finish_reason, text)
    if problem is not None:
        return problem
    if require_text and not text.strip():
        return "empty", "empty answer for a page whose text layer has text"
    repetition = find_repetition(text)
    if repetition is not None:
        return "repetition", f"runaway repetition: {repetition.describe()}"
    return None


def log_rejected(label: str, reason: str, detail: str, *, ask: int, max_reasks: int) -> None:
    """One line per rejected answer, saying whether it is asked again (every ask is a request)."""
    log.warning("%s: %s answer (%s); %s", label, reason, detail, "asking again" if ask <= max_reasks else "giving up")


def next_max_tokens(max_tokens: int, reason: str, ceiling: int = 131_072) -> int:
    """The budget of the next ask: doubled after a truncation (up to ``ceiling``), unchanged otherwise."""
    return min(ceiling, max_tokens * 2) if reason == "truncated" else max_tokens
