"""Content-derived identifiers shared by the pdf and storage modules (no imports of either: no cycles)."""

from __future__ import annotations

import hashlib

#: hex characters of the sha256 kept in a doc_id: 64 bits, so collisions stay negligible for a billion documents
DOC_ID_HEX_CHARS = 16


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def doc_id_for(data: bytes) -> str:
    """The document id of a PDF: the first 16 hex characters of the sha256 of its bytes.

    Derived from content only, so the same file dropped twice (under any name) is one document.
    """
    return sha256_hex(data)[:DOC_ID_HEX_CHARS]


def doc_id_from_sha256(sha256: str) -> str:
    """The doc_id for an already computed sha256 hex digest (avoids hashing large files twice)."""
    return sha256[:DOC_ID_HEX_CHARS].lower()
