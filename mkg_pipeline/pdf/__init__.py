"""PDF handling with PyMuPDF only: validation (:mod:`.validate`) and page rendering (:mod:`.render`).

No Dagster, no storage: both work on the bytes of one document, so they can be used from a plain script.
:mod:`.pool` runs such work in worker processes that are killed when one document overruns its time.
"""

from mkg_pipeline.pdf.render import PageFailure, RenderedPage, effective_dpi, encode_png, iter_rendered_pages
from mkg_pipeline.pdf.validate import PDFInfo, PDFRejected, error_text, validate_pdf

__all__ = [
    "PDFInfo",
    "PDFRejected",
    "PageFailure",
    "RenderedPage",
    "effective_dpi",
    "encode_png",
    "error_text",
    "iter_rendered_pages",
    "validate_pdf",
]
