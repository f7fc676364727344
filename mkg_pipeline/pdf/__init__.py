"""PDF handling with PyMuPDF only: validation (:mod:`.validate`) and page rendering (:mod:`.render`).

No Dagster, no storage: both work on the bytes of one document, so they can be used from a plain script.
"""

from mkg_pipeline.pdf.render import PageFailure, RenderedPage, effective_dpi, iter_rendered_pages
from mkg_pipeline.pdf.validate import PageSizeCount, PDFInfo, PDFRejected, validate_pdf

__all__ = [
    "PDFInfo",
    "PDFRejected",
    "PageFailure",
    "PageSizeCount",
    "RenderedPage",
    "effective_dpi",
    "iter_rendered_pages",
    "validate_pdf",
]
