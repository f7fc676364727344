"""The quality checks never pass a comparison that did not happen (issue 20)."""

from __future__ import annotations

import dagster as dg

from mkg_pipeline.orchestration.checks import BASELINE_SIMILARITY, TEXT_LAYER_SIMILARITY, evaluate_quality
from mkg_pipeline.quality.diff import PageDiff, QualityReport


def _page(baseline: float | None, text_layer: float | None) -> PageDiff:
    return PageDiff("d1", "a.pdf", 1, "compared", baseline, text_layer, "out", "ref")


def _results(report: QualityReport) -> dict[str, dg.AssetCheckResult]:
    return {r.check_name: r for r in evaluate_quality(report, min_baseline=0.9, min_text_layer=0.8) if r.check_name}


def test_nothing_compared_is_a_visible_warning_not_a_pass() -> None:
    results = _results(QualityReport("b1", "default", "e", pages=[_page(None, None)]))
    for name in (BASELINE_SIMILARITY, TEXT_LAYER_SIMILARITY):
        assert not results[name].passed
        assert results[name].severity == dg.AssetCheckSeverity.WARN  # shown, but blocks nothing
        assert "Nothing compared" in (results[name].description or "")
        assert results[name].metadata["pages_compared"].value == 0
    # An empty batch (every file rejected) compares nothing either.
    assert not any(r.passed for r in _results(QualityReport("b2", "default", "e")).values())


def test_compared_pages_pass_or_fail_on_the_threshold() -> None:
    results = _results(QualityReport("b1", "default", "e", pages=[_page(0.95, 0.5), _page(0.97, None)]))
    baseline, text_layer = results[BASELINE_SIMILARITY], results[TEXT_LAYER_SIMILARITY]
    assert baseline.passed and baseline.severity == dg.AssetCheckSeverity.ERROR
    assert baseline.metadata["pages_compared"].value == 2
    assert baseline.metadata["mean_similarity"].value == 0.96
    assert not text_layer.passed and text_layer.severity == dg.AssetCheckSeverity.WARN
