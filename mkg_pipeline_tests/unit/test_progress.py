from mkg_pipeline.progress import format_duration, rate_and_eta


def test_rate_and_eta() -> None:
    assert rate_and_eta(0, 10, 30.0) == "-- pages/s, ETA --"  # no rate before the first page
    assert rate_and_eta(5, 10, 10.0) == "0.50 pages/s, ETA 10s"
    assert rate_and_eta(3, 63, 60.0) == "3.0 pages/min, ETA 20m00s"  # a slow CPU OCR is not "0.0 pages/s"
    assert rate_and_eta(10, 10, 4.0) == "2.50 pages/s, done"


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0.4, 42, 185, 3725)] == ["0s", "42s", "3m05s", "1h02m"]
