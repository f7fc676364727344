"""Rates and ETAs for progress lines: one wording for the demo's progress bar and the run log."""

from __future__ import annotations


def format_duration(seconds: float) -> str:
    """``"1h02m"``, ``"3m05s"``, ``"42s"``: short enough for a progress line."""
    total = max(round(seconds), 0)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_rate(done: int, elapsed_s: float) -> str:
    """Pages per second with two significant decimals; per minute when below one page in ten seconds."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    if 0 < rate < 0.1:
        return f"{rate * 60:.1f} pages/min"
    return f"{rate:.2f} pages/s"


def rate_and_eta(done: int, total: int, elapsed_s: float) -> str:
    """``"0.42 pages/s, ETA 1m05s"`` from the pages done so far; no rate before the first page, since a
    rate measured over nothing would promise an ETA it cannot know."""
    if done <= 0 or elapsed_s <= 0:
        return "-- pages/s, ETA --"
    if done >= total:
        return f"{format_rate(done, elapsed_s)}, done"
    left_s = (total - done) * elapsed_s / done
    return f"{format_rate(done, elapsed_s)}, ETA {format_duration(left_s)}"
