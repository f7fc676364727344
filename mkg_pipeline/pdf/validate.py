"""Open and validate an incoming PDF before anything expensive happens to it.

:func:`validate_pdf` either returns a :class:`PDFInfo` or raises
:class:`PDFRejected` with a short, stable ``reason`` code (used in metrics,
``rejected/<name>.json`` and dashboards) and a message meant for the person who
dropped the file. Every document-level PyMuPDF failure becomes a
``PDFRejected``: one bad file must never crash the batch it arrived in.

Checks run cheapest first: size limits and the header before parsing, page
count before touching any page, and only then one page load + thumbnail render
to prove at least one page is readable. No check walks every page: the cost of
validating a document does not grow with its length (the readability probe only
moves on when a page fails). A document that is slow to interpret anyway (a
pathological content stream) is bounded by the caller, which runs validation in
a worker process killed after ``workers.timeout_s`` (``validation_timeout``).

What PyMuPDF 1.x (the pinned ``pymupdf<2``; MuPDF 1.2x) does with the corpus's
bad files, and why the checks look the way they do:

* ``bad-not-a-pdf.pdf`` (17 bytes of text): no ``%PDF-`` header; ``open``
  raises ``FileDataError``. We reject on the header before calling MuPDF. The
  header must start the file (after optional whitespace or a UTF-8 byte order
  mark), as strict readers require: MuPDF itself would also find a header
  further in, e.g. in a ZIP archive holding an uncompressed PDF, and open the
  member as if it were the file.
* ``bad-encrypted-password.pdf``: opens, ``needs_pass`` is true, every page
  access fails until authenticated.
* ``bad-truncated.pdf`` (first 40 kB of a 5-page paper) and
  ``bad-unreadable-pages.pdf`` (a broken xref/page tree): MuPDF silently
  *repairs* them (``is_repaired`` true, warnings only on stderr) and the
  repaired document has ``page_count == 0``. No exception is raised, so "zero
  pages" must be checked explicitly; the repair is mentioned in the message.
* A page that is listed but cannot be loaded or drawn raises on
  ``load_page``/``get_pixmap``; only if *every* page does is the document
  rejected (single bad pages are the renderer's business: ``PageFailure``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

import pymupdf

from mkg_pipeline.config import PDFConfig
from mkg_pipeline.ids import doc_id_from_sha256, sha256_hex

log = logging.getLogger(__name__)

#: the stable reason codes a rejection can carry
NOT_A_PDF: Final = "not_a_pdf"
ENCRYPTED: Final = "encrypted"
NO_READABLE_PAGES: Final = "no_readable_pages"
TOO_MANY_PAGES: Final = "too_many_pages"
TOO_LARGE: Final = "too_large"
EMPTY_FILE: Final = "empty_file"
#: validation did not finish within workers.timeout_s (set by the ingest stage, which runs the worker)
VALIDATION_TIMEOUT: Final = "validation_timeout"
REJECT_REASONS: Final = frozenset(
    {NOT_A_PDF, ENCRYPTED, NO_READABLE_PAGES, TOO_MANY_PAGES, TOO_LARGE, EMPTY_FILE, VALIDATION_TIMEOUT}
)

_HEADER: Final = b"%PDF-"
#: what may precede the header: a UTF-8 byte order mark, then PDF whitespace (NUL, HT, LF, FF, CR, space)
_BOM: Final = b"\xef\xbb\xbf"
_LEADING_WHITESPACE: Final = b"\x00\t\n\x0c\r "
#: only this much of the file is looked at for the header (whitespace before it is bounded too)
_HEADER_WINDOW: Final = 1024
#: pages sampled for the text-layer check, spread over the document (first, last and between)
TEXT_SAMPLE_PAGES: Final = 5
#: the readability probe renders a thumbnail at most this many pixels on its long side
_PROBE_PX: Final = 32


class PDFRejected(Exception):
    """A document that will not be processed, with a stable ``reason`` code and the file it came from."""

    def __init__(self, source: str, reason: str, detail: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; expected one of {sorted(REJECT_REASONS)}")
        self.source = source
        self.reason = reason
        self.detail = detail
        super().__init__(f"{source} {detail}")

    def __reduce__(self) -> tuple[type[PDFRejected], tuple[str, str, str]]:
        # Exceptions cross process boundaries (Dagster, multiprocessing); keep all three fields when pickled.
        return (type(self), (self.source, self.reason, self.detail))


@dataclass(frozen=True)
class PDFInfo:
    """What validation learned about an accepted PDF (what ``raw/<doc_id>.json`` records)."""

    source: str
    page_count: int
    byte_size: int
    sha256: str
    doc_id: str
    has_text_layer: bool  # any of up to TEXT_SAMPLE_PAGES sampled pages has extractable text


def _describe_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def error_text(exc: BaseException) -> str:
    """``Type: message`` of an exception, for records and logs (the type alone when the message is empty)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_byte_limits(data: bytes, source: str, limits: PDFConfig) -> None:
    """Reject empty, oversized and non-PDF input from the bytes alone, before any parsing."""
    size = len(data)
    if size == 0:
        raise PDFRejected(source, EMPTY_FILE, "is an empty file (0 bytes); the upload was probably interrupted")
    if size > limits.max_bytes:
        raise PDFRejected(
            source,
            TOO_LARGE,
            f"is {_describe_bytes(size)} ({size} bytes), over the limit of {_describe_bytes(limits.max_bytes)} "
            "(pdf.max_bytes); split the document or raise the limit",
        )
    _check_header(data, source)


def _check_header(data: bytes, source: str) -> None:
    head = data[:_HEADER_WINDOW]
    head = head[len(_BOM) :] if head.startswith(_BOM) else head
    if not head.lstrip(_LEADING_WHITESPACE).startswith(_HEADER):
        raise PDFRejected(
            source, NOT_A_PDF, f"is not a PDF: a PDF starts with '%PDF-' but this file starts with {data[:16]!r}"
        )


@contextmanager
def open_pdf(data: bytes, source: str) -> Iterator[pymupdf.Document]:
    """Open ``data`` as a PDF; refuse non-PDFs and password-protected files with :class:`PDFRejected`.

    The document is closed on exit, which frees MuPDF's per-document memory right away.
    """
    _check_header(data, source)
    try:
        # filetype="pdf": never let MuPDF sniff the stream as an image, XPS or plain text document.
        doc = pymupdf.open(stream=data, filetype="pdf")
    except Exception as exc:  # FileDataError and friends: MuPDF could not even repair it
        raise PDFRejected(
            source, NOT_A_PDF, f"starts like a PDF but is too damaged to be opened as one ({error_text(exc)})"
        ) from exc
    with doc:
        if doc.needs_pass:
            raise PDFRejected(
                source,
                ENCRYPTED,
                "is password-protected (encrypted PDF) and cannot be read without the password; "
                "ask the sender for an unprotected copy",
            )
        yield doc


def _probe_page(doc: pymupdf.Document, index: int) -> None:
    """Load one page and draw a thumbnail of it: raises if the page cannot be read."""
    page = doc.load_page(index)
    rect = page.rect
    longest = max(rect.width, rect.height)
    if longest <= 0:
        raise ValueError(f"page has an empty area ({rect})")
    zoom = min(1.0, _PROBE_PX / longest)
    # Rendering (not just loading) interprets the content stream, which is where damaged pages fail.
    page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False)


def _require_readable_page(doc: pymupdf.Document, source: str, page_count: int) -> int:
    """Return the 0-based index of the first readable page; reject if there is none.

    Usually page 1 answers at once; only a document whose pages all fail is scanned to the end.
    """
    first_error = ""
    for index in range(page_count):
        try:
            _probe_page(doc, index)
        except Exception as exc:
            if not first_error:
                first_error = f"page {index + 1}: {error_text(exc)}"
            log.debug("%s: page %d is unreadable: %s", source, index + 1, exc)
            continue
        return index
    raise PDFRejected(
        source,
        NO_READABLE_PAGES,
        f"has no readable pages: all {page_count} page(s) failed to load or render (first failure: {first_error})",
    )


def _sample_indices(page_count: int, samples: int = TEXT_SAMPLE_PAGES) -> list[int]:
    if page_count <= samples:
        return list(range(page_count))
    return sorted({round(i * (page_count - 1) / (samples - 1)) for i in range(samples)})


def _has_text_layer(doc: pymupdf.Document, source: str, page_count: int) -> bool:
    for index in _sample_indices(page_count):
        try:
            if doc.load_page(index).get_text("text").strip():
                return True
        except Exception as exc:  # a broken page says nothing about the others
            log.debug("%s: text layer of page %d unreadable: %s", source, index + 1, exc)
    return False


def validate_pdf(data: bytes, source: str, limits: PDFConfig) -> PDFInfo:
    """Validate one PDF's bytes against ``limits``; raise :class:`PDFRejected` if it cannot be processed.

    ``source`` is the file name shown in messages (e.g. the incoming object's name).
    """
    check_byte_limits(data, source, limits)
    with open_pdf(data, source) as doc:
        try:
            page_count = doc.page_count
            repaired = bool(doc.is_repaired)
        except Exception as exc:
            raise PDFRejected(source, NOT_A_PDF, f"has an unreadable page tree ({error_text(exc)})") from exc
        if page_count == 0:
            why = " after MuPDF repaired its damaged structure (the file is likely truncated or corrupt)"
            detail = "has no readable pages: 0 pages found" + (why if repaired else "")
            raise PDFRejected(source, NO_READABLE_PAGES, detail)
        if page_count > limits.max_pages:
            raise PDFRejected(
                source,
                TOO_MANY_PAGES,
                f"has {page_count} pages, over the limit of {limits.max_pages} (pdf.max_pages); "
                "split the document or raise the limit",
            )
        _require_readable_page(doc, source, page_count)
        has_text = _has_text_layer(doc, source, page_count)
    # Hash last: rejected files (possibly huge) never pay for it.
    digest = sha256_hex(data)
    return PDFInfo(
        source=source,
        page_count=page_count,
        byte_size=len(data),
        sha256=digest,
        doc_id=doc_id_from_sha256(digest),
        has_text_layer=has_text,
    )
