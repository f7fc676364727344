"""pdf.validate against the real corpus: every file's outcome is the one manifest.json expects."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from mkg_pipeline.config import PDFConfig
from mkg_pipeline.ids import doc_id_for
from mkg_pipeline.pdf.validate import PDFRejected, validate_pdf
from mkg_pipeline_tests.fixtures.corpus import corpus_manifest, corpus_pdf

MANIFEST = corpus_manifest()
# manifest.json words the reasons for people ("reject: not a PDF"); the code uses stable codes
REASON_CODES = {"encrypted": "encrypted", "not a PDF": "not_a_pdf", "no readable pages": "no_readable_pages"}
LIMITS = PDFConfig()


def raw_pdf(objects: list[str]) -> bytes:
    """A hand-built PDF with a correct xref table, for page-tree damage the corpus does not have."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_corpus_outcome_matches_manifest(name: str) -> None:
    entry: dict[str, Any] = MANIFEST[name]
    data = corpus_pdf(name).read_bytes()
    expect = entry["expect"]
    if expect == "ok":
        info = validate_pdf(data, name, LIMITS)
        assert info.page_count == entry["pages"]
        assert info.byte_size == entry["bytes"] == len(data)
        assert info.sha256 == entry["sha256"]
        assert info.doc_id == entry["sha256"][:16]
        # The sampled check agrees with the full text layer count of the manifest on every corpus file.
        assert info.has_text_layer == (entry["text_layer_chars"] > 0)
        return
    assert expect.startswith("reject: ")
    with pytest.raises(PDFRejected) as caught:
        validate_pdf(data, name, LIMITS)
    rejection = caught.value
    assert rejection.reason == REASON_CODES[expect.removeprefix("reject: ")]
    assert rejection.source == name
    assert name in str(rejection)


def test_rejection_messages_say_what_is_wrong() -> None:
    def message(name: str) -> str:
        with pytest.raises(PDFRejected) as caught:
            validate_pdf(corpus_pdf(name).read_bytes(), name, LIMITS)
        return str(caught.value)

    assert "password" in message("bad-encrypted-password.pdf")
    assert "is not a PDF" in message("bad-not-a-pdf.pdf")
    truncated = message("bad-truncated.pdf")
    assert "no readable pages" in truncated
    assert "truncated or corrupt" in truncated  # MuPDF repaired it to 0 pages: say so


def test_rejection_survives_pickling() -> None:
    original = PDFRejected("x.pdf", "encrypted", "is password-protected")
    copy = pickle.loads(pickle.dumps(original))
    assert (copy.source, copy.reason, copy.detail, str(copy)) == ("x.pdf", "encrypted", original.detail, str(original))


def test_unknown_reason_code_is_a_bug() -> None:
    with pytest.raises(ValueError, match="unknown rejection reason"):
        PDFRejected("x.pdf", "bad", "whatever")


def test_too_many_pages() -> None:
    data = corpus_pdf("pdflatex-4-pages.pdf").read_bytes()
    with pytest.raises(PDFRejected) as caught:
        validate_pdf(data, "pdflatex-4-pages.pdf", PDFConfig(max_pages=1))
    assert caught.value.reason == "too_many_pages"
    assert "4 pages" in str(caught.value) and "limit of 1" in str(caught.value)
    assert validate_pdf(data, "pdflatex-4-pages.pdf", PDFConfig(max_pages=4)).page_count == 4


def test_too_large_is_checked_before_parsing() -> None:
    limits = PDFConfig(max_bytes=1024)
    # Garbage over the limit is "too large", not "not a PDF": the size check comes first and parses nothing.
    with pytest.raises(PDFRejected) as caught:
        validate_pdf(b"x" * 4096, "junk.bin", limits)
    assert caught.value.reason == "too_large"
    data = corpus_pdf("minimal-document.pdf").read_bytes()
    with pytest.raises(PDFRejected) as caught:
        validate_pdf(data, "minimal-document.pdf", limits)
    assert caught.value.reason == "too_large"
    assert f"({len(data)} bytes)" in str(caught.value)


def test_empty_file() -> None:
    with pytest.raises(PDFRejected) as caught:
        validate_pdf(b"", "empty.pdf", LIMITS)
    assert caught.value.reason == "empty_file"
    assert "empty.pdf" in str(caught.value)


def test_pdf_header_but_unparseable_is_not_a_pdf() -> None:
    with pytest.raises(PDFRejected) as caught:
        validate_pdf(b"%PDF-1.4\n" + b"\x00" * 64, "stub.pdf", LIMITS)
    assert caught.value.reason == "not_a_pdf"
    assert "too damaged" in str(caught.value)


def test_every_page_unreadable_is_no_readable_pages() -> None:
    # The page tree claims two pages but its Kids are null: MuPDF counts 2 pages and fails to load each.
    data = raw_pdf(["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [null null] /Count 2 >>"])
    with pytest.raises(PDFRejected) as caught:
        validate_pdf(data, "hollow.pdf", LIMITS)
    assert caught.value.reason == "no_readable_pages"
    assert "all 2 page(s) failed" in str(caught.value)


def test_some_unreadable_pages_are_accepted() -> None:
    # Count 3, one real page: the document is kept, the renderer reports the two missing pages.
    page = "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>"
    data = raw_pdf(["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [3 0 R] /Count 3 >>", page])
    info = validate_pdf(data, "partial.pdf", LIMITS)
    assert info.page_count == 3


def test_doc_id_is_deterministic_sha256_prefix() -> None:
    entry = MANIFEST["two-pages.pdf"]
    data = corpus_pdf("two-pages.pdf").read_bytes()
    assert doc_id_for(data) == doc_id_for(bytes(data)) == entry["sha256"][:16]
    first = validate_pdf(data, "two-pages.pdf", LIMITS)
    again = validate_pdf(data, "renamed-copy.pdf", LIMITS)
    assert first.doc_id == again.doc_id == entry["sha256"][:16]


def _zip_holding(member: bytes) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("report.pdf", member)
    return buffer.getvalue()


def test_pdf_header_must_start_the_file() -> None:
    pdf = corpus_pdf("minimal-document.pdf").read_bytes()
    # A ZIP whose member is a stored (uncompressed) PDF carries '%PDF-' 40 bytes in: readers refuse it.
    zipped = _zip_holding(pdf)
    assert b"%PDF-" in zipped[:100]
    with pytest.raises(PDFRejected) as caught:
        validate_pdf(zipped, "report.pdf", LIMITS)
    assert caught.value.reason == "not_a_pdf"
    assert "starts with b'PK" in str(caught.value)
    # Leading whitespace and a UTF-8 byte order mark are tolerated, as readers do.
    for prefix in (b"\xef\xbb\xbf", b"\r\n  \t", b"\xef\xbb\xbf\n"):
        assert validate_pdf(prefix + pdf, "padded.pdf", LIMITS).page_count == 1
