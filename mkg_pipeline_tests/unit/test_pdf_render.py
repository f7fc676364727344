"""pdf.render on the real corpus: PNG validity, sizes, rotation, odd pages, text layer, streaming."""

from __future__ import annotations

import hashlib
import math
import struct
import tracemalloc

import pymupdf
import pytest

from mkg_pipeline.pdf.render import (
    MIN_SIDE_PX,
    PageFailure,
    RenderedPage,
    effective_dpi,
    encode_png,
    iter_rendered_pages,
)
from mkg_pipeline.pdf.validate import PDFRejected
from mkg_pipeline_tests.fixtures.corpus import corpus_manifest, corpus_pdf
from mkg_pipeline_tests.fixtures.pathological import huge_page_pdf
from mkg_pipeline_tests.unit.test_pdf_validate import raw_pdf

BIG = 40_000_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def render(name: str, dpi: int = 36, max_pixels: int = BIG, **kwargs: object) -> list[RenderedPage | PageFailure]:
    return list(iter_rendered_pages(corpus_pdf(name).read_bytes(), name, dpi, max_pixels, **kwargs))


def pages_of(name: str, dpi: int = 36, max_pixels: int = BIG) -> list[RenderedPage]:
    items = render(name, dpi, max_pixels)
    assert all(isinstance(item, RenderedPage) for item in items), items
    return [item for item in items if isinstance(item, RenderedPage)]


def png_header(png: bytes) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from the IHDR chunk."""
    assert png[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", png[8:16])
    assert (length, kind) == (13, b"IHDR")
    width, height, depth, colour = struct.unpack(">IIBB", png[16:26])
    return width, height, depth, colour


def expected_px(points: float, dpi: float) -> int:
    """Pixels for ``points`` at ``dpi`` as MuPDF rounds them (outwards, tolerating float noise)."""
    return math.ceil(points * dpi / 72 - 0.001)


def assert_size_matches(page: RenderedPage) -> None:
    assert abs(page.width_px - page.width_pt * page.dpi / 72) < 1, page
    assert abs(page.height_px - page.height_pt * page.dpi / 72) < 1, page


@pytest.mark.parametrize(
    "name", ["minimal-document.pdf", "two-pages.pdf", "pdflatex-4-pages.pdf", "rotated-arabic-4p.pdf", "patent-8p.pdf"]
)
def test_page_count_matches_manifest(name: str) -> None:
    pages = pages_of(name)
    assert [p.number for p in pages] == list(range(1, corpus_manifest()[name]["pages"] + 1))


def test_page_is_rgb_png_of_the_right_size() -> None:
    (page,) = pages_of("minimal-document.pdf", dpi=150)
    width, height, depth, colour = png_header(page.png)
    assert (width, height) == (page.width_px, page.height_px)
    assert (depth, colour) == (8, 2)  # 8-bit RGB, no alpha channel
    assert page.dpi == 150
    # A4 at 150 dpi: points x dpi / 72, MuPDF rounding outwards to whole pixels
    assert_size_matches(page)
    assert (page.width_px, page.height_px) == (1241, 1754)
    decoded = pymupdf.Pixmap(page.png)
    assert (decoded.width, decoded.height, decoded.n, decoded.alpha) == (page.width_px, page.height_px, 3, 0)
    assert page.png_sha256 == hashlib.sha256(page.png).hexdigest()


def test_rendering_is_deterministic() -> None:
    first = pages_of("pdflatex-4-pages.pdf")
    second = pages_of("pdflatex-4-pages.pdf")
    # The VLM cache key hashes the page image: the same page must give the same bytes every time.
    assert [p.png_sha256 for p in first] == [p.png_sha256 for p in second]


def test_rotation_is_applied() -> None:
    (page,) = pages_of("edgar-rotated90.pdf", dpi=72)
    assert page.rotation == 90
    with pymupdf.open(corpus_pdf("edgar-rotated90.pdf")) as doc:
        mediabox = doc[0].mediabox
    assert mediabox.width < mediabox.height  # stored portrait ...
    assert (page.width_pt, page.height_pt) == (mediabox.height, mediabox.width)  # ... shown landscape
    assert page.width_px > page.height_px
    assert (page.width_px, page.height_px) == (792, 612)
    assert page.rotation_applied == 0  # no routing, no text direction: drawn as /Rotate says


def test_a_page_whose_rotate_turns_its_text_sideways_is_drawn_upright_when_routed() -> None:
    """Issue 19 item 4: edgar-rotated90's text runs upright in the page's own space, so its /Rotate 90
    shows it sideways; routed (any mode), the image is turned back: portrait, text left to right."""
    data = corpus_pdf("edgar-rotated90.pdf").read_bytes()
    (page,) = list(iter_rendered_pages(data, "edgar-rotated90.pdf", 72, BIG, routing_mode="vlm"))
    assert isinstance(page, RenderedPage)
    assert page.routing is not None and page.routing["features"]["text_direction"] == 0
    assert (page.rotation, page.rotation_applied) == (90, 270)
    assert (page.width_px, page.height_px) == (612, 792)


def test_each_rotation_swaps_sides_as_displayed() -> None:
    pages = pages_of("rotated-arabic-4p.pdf")
    for page in pages:
        landscape = page.width_px > page.height_px
        assert landscape == (page.rotation in (90, 270)), page
        assert_size_matches(page)
    assert {p.rotation for p in pages} >= {90, 180, 270}


@pytest.mark.parametrize("dpi", [36, 150])
def test_tiny_pages_render(dpi: int) -> None:
    pages = pages_of("scanned-images-6p.pdf", dpi=dpi)
    assert len(pages) == 6
    for page in pages:
        assert page.width_pt == pytest.approx(3.84, abs=0.01)
        # 3.84 pt would be 2-8 px; the renderer raises the DPI so the shorter side has MIN_SIDE_PX pixels.
        assert min(page.width_px, page.height_px) >= MIN_SIDE_PX
        assert page.dpi > dpi
        assert_size_matches(page)
        decoded = pymupdf.Pixmap(page.png)
        samples = decoded.samples
        colours = {samples[i : i + 3] for i in range(0, len(samples), 3)}
        assert len(colours) >= 2, f"page {page.number} rendered blank"  # the 16x16 image was decoded


def test_dpi_is_lowered_for_huge_renders() -> None:
    (page,) = pages_of("minimal-document.pdf", dpi=150, max_pixels=10_000)
    assert page.dpi < 150
    assert page.width_px * page.height_px <= 10_000
    assert_size_matches(page)
    assert png_header(page.png)[:2] == (page.width_px, page.height_px)


def test_effective_dpi() -> None:
    assert effective_dpi(612, 792, 150, BIG) == 150
    lowered = effective_dpi(612, 792, 150, 1_000_000)
    assert lowered < 150
    assert expected_px(612, lowered) * expected_px(792, lowered) <= 1_000_000
    assert effective_dpi(612, 792, 150, 1_000_000) == lowered  # stable
    assert effective_dpi(3.84, 3.84, 150, BIG) == pytest.approx(300, abs=0.01)
    # The pixel cap wins over the minimum side: a 1 pt x 14400 pt ribbon stays under the cap.
    ribbon = effective_dpi(1, 14_400, 150, 10_000)
    assert expected_px(1, ribbon) * expected_px(14_400, ribbon) <= 10_000
    with pytest.raises(ValueError):
        effective_dpi(0, 100, 150, BIG)


def test_text_layer_of_born_digital_and_scanned_pages() -> None:
    (digital,) = pages_of("minimal-document.pdf")
    assert len(digital.text_layer.strip()) > 100
    (scan,) = pages_of("edgar-scanned.pdf")
    assert scan.text_layer.strip() == ""
    manifest = corpus_manifest()
    chars = sum(len(p.text_layer) for p in pages_of("pdflatex-4-pages.pdf"))
    assert chars == pytest.approx(manifest["pdflatex-4-pages.pdf"]["text_layer_chars"], rel=0.05)


def test_selected_pages_only() -> None:
    pages = render("pdflatex-4-pages.pdf", page_numbers=[4, 2])
    assert [p.number for p in pages] == [4, 2]
    with pytest.raises(ValueError, match=r"outside 1\.\.4"):
        render("pdflatex-4-pages.pdf", page_numbers=[5])


def test_one_bad_page_fails_only_itself() -> None:
    page = "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] >>"
    data = raw_pdf(["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [3 0 R] /Count 3 >>", page])
    items = list(iter_rendered_pages(data, "partial.pdf", 72, BIG))
    assert isinstance(items[0], RenderedPage)
    assert (items[0].width_px, items[0].height_px) == (200, 100)
    failures = items[1:]
    assert [f.number for f in failures] == [2, 3]
    assert all(isinstance(f, PageFailure) and f.reason == "load_failed" and f.error for f in failures)


def test_document_level_problems_raise_pdf_rejected() -> None:
    for name, reason in [("bad-not-a-pdf.pdf", "not_a_pdf"), ("bad-encrypted-password.pdf", "encrypted")]:
        with pytest.raises(PDFRejected) as caught:
            render(name)
        assert caught.value.reason == reason


def test_streaming_holds_one_page_at_a_time() -> None:
    name = "geotopo-book-117p.pdf"
    data = corpus_pdf(name).read_bytes()
    total_png = 0
    largest_png = 0
    pages = 0
    # tracemalloc sees Python objects (the PNG bytes, text layers), not MuPDF's C heap: exactly what a
    # consumer-facing leak (a list of pages kept somewhere) would show up in.
    tracemalloc.start()
    try:
        for item in iter_rendered_pages(data, name, 36, BIG):
            assert isinstance(item, RenderedPage)
            pages += 1
            total_png += len(item.png)
            largest_png = max(largest_png, len(item.png))
            del item
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pages == 117
    # Holding the book would need total_png (about 2.6 MB at 36 dpi); one page at a time needs about one PNG.
    assert peak < total_png / 5, (peak, total_png, largest_png)
    assert peak < 4 * largest_png + 512 * 1024, (peak, largest_png)


@pytest.mark.parametrize("level", [1, 3, 6])
def test_own_png_encoder_is_pixel_identical_to_mupdfs(level: int) -> None:
    with pymupdf.open(corpus_pdf("rotated-arabic-4p.pdf")) as doc:
        pix = doc[1].get_pixmap(matrix=pymupdf.Matrix(0.5, 0.5), colorspace=pymupdf.csRGB, alpha=False)
        grey = doc[1].get_pixmap(matrix=pymupdf.Matrix(0.5, 0.5), colorspace=pymupdf.csGRAY, alpha=False)
    for image in (pix, grey):
        png = encode_png(image, level)
        width, height, depth, colour = png_header(png)
        assert (width, height, depth, colour) == (image.width, image.height, 8, 2 if image.n == 3 else 0)
        decoded = pymupdf.Pixmap(png)
        assert (decoded.width, decoded.height, decoded.n) == (image.width, image.height, image.n)
        assert decoded.samples == image.samples  # lossless
        assert encode_png(image, level) == png  # deterministic: the VLM cache key hashes these bytes
    # zlib level 6, filter None is what MuPDF's own encoder does: same size but for its extra chunks (pHYs)
    if level == 6:
        assert abs(len(encode_png(pix, 6)) - len(pix.tobytes("png"))) <= 64


def test_own_png_encoder_refuses_alpha() -> None:
    with pymupdf.open(corpus_pdf("minimal-document.pdf")) as doc:
        pix = doc[0].get_pixmap(matrix=pymupdf.Matrix(0.1, 0.1), alpha=True)
    with pytest.raises(ValueError, match="without alpha"):
        encode_png(pix)


@pytest.mark.parametrize(
    ("side_pt", "user_unit"), [(1e7, None), (200_000, None), (14_400, 100)], ids=["1e7pt", "200000pt", "userunit"]
)
def test_a_page_too_large_to_read_is_a_failure_not_a_blank_image(side_pt: float, user_unit: float | None) -> None:
    """Issue 21 row 7: a 1e7 pt page was drawn at 0.04 dpi (a blank image) and recorded as rendered."""
    (item,) = iter_rendered_pages(huge_page_pdf(side_pt, user_unit=user_unit), "huge.pdf", 150, BIG)
    assert isinstance(item, PageFailure), item
    assert item.reason == "page_too_large"
    assert "dpi" in item.error and "pdf.max_render_pixels" in item.error


def test_the_largest_page_pdf_allows_still_renders() -> None:
    """14,400 pt (200 in) is the largest page PDF allows without /UserUnit: drawn within the pixel cap."""
    (page,) = iter_rendered_pages(huge_page_pdf(14_400), "poster.pdf", 150, BIG)
    assert isinstance(page, RenderedPage), page
    assert page.width_px * page.height_px <= BIG and page.dpi == pytest.approx(31.6, abs=0.1)
