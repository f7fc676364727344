"""Records that prove themselves: is this stored page result, status or page manifest valid for its key?

A record counts as done only if it parses and says it is the record its key names: a page result
``vlm/<doc_id>/pages/<n>.<cache_key>.json`` must carry that ``doc_id``, page ``n``, ``cache_key`` and the
engine identity it was asked for, and the fields the assembly reads; a ``status.json`` must be an object
of its document with a known state and well-formed failures. Anything else (an empty object, half a JSON
text, ``[]``, ``{}``, another page's record copied under this key) is *unreadable*: the vlm stage treats
it as missing (the page is requested again and the object overwritten; the status is rewritten) and the
audit names it with the command that repairs it. Both use these functions, so they never disagree.

Each check returns the problem as a short sentence, or ``None`` when the record is valid. Parsing is
separate from reading: an S3 error while reading is an S3 error (the caller's), never a ``ValueError``
here, and a corrupt record is never an S3 failure.

Pure functions; no I/O, no Dagster.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

#: the states a status.json may record (vlm stage, DocumentStatus.state, plus "stale")
STATUS_STATES = frozenset({"complete", "partial", "failed", "stale"})


def parse_json(data: bytes) -> tuple[Any, str | None]:
    """(value, None), or (None, why it is not JSON)."""
    if not data:
        return None, "the object is empty (0 bytes)"
    try:
        return json.loads(data), None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return None, f"not valid JSON ({len(data)} bytes): {exc}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shape(value: Any) -> str:
    return "a JSON " + {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)


def page_record_problem(record: Any, *, doc_id: str, page: int, cache_key: str, engine: str) -> str | None:
    """Why ``record`` is not the page result of (``doc_id``, ``page``, ``cache_key``, ``engine``), or None."""
    if not isinstance(record, Mapping):
        return f"{_shape(record)}, not a page record"
    expected = {"doc_id": doc_id, "page": page, "cache_key": cache_key, "engine": engine}
    for name, want in expected.items():
        if name not in record:
            return f"no {name!r} field (a page record names its document, page, cache key and engine)"
        got = record[name]
        if name == "page" and not _is_int(got):
            return f"'page' is {got!r}, not a page number"
        if got != want:
            return f"it is the record of {name} {got!r}, not {want!r}"
    if not isinstance(record.get("markdown"), str):
        return "no 'markdown' text"
    if not isinstance(record.get("content_list"), list):
        return "no 'content_list' list"
    return None


def status_problem(status: Any, *, doc_id: str) -> str | None:
    """Why ``status`` is not a status.json of ``doc_id``, or None."""
    if not isinstance(status, Mapping):
        return f"{_shape(status)}, not a status object"
    if status.get("doc_id") != doc_id:
        return f"it is the status of document {status.get('doc_id')!r}, not {doc_id!r}"
    if not isinstance(status.get("engine"), str):
        return "no 'engine' identity"
    if status.get("state") not in STATUS_STATES:
        return f"'state' is {status.get('state')!r}, not one of {sorted(STATUS_STATES)}"
    failed = status.get("failed_pages")
    if not isinstance(failed, list) or not all(isinstance(f, Mapping) and _is_int(f.get("page")) for f in failed):
        return "'failed_pages' is not a list of failures with their page numbers"
    if "pages_done" in status and not _is_int(status["pages_done"]):
        return f"'pages_done' is {status['pages_done']!r}, not a number"
    fallbacks = status.get("fallback_pages", [])
    if not isinstance(fallbacks, list) or not all(
        isinstance(f, Mapping) and _is_int(f.get("page")) and isinstance(f.get("reason"), str) for f in fallbacks
    ):
        return "'fallback_pages' is not a list of fallback pages with their page numbers and reasons"
    etags = status.get("page_etags", {})
    if not isinstance(etags, Mapping) or not all(isinstance(v, str) for v in etags.values()):
        return "'page_etags' is not an object of page number -> ETag"
    return None


def page_manifest_problem(manifest: Any, *, doc_id: str) -> str | None:
    """Why ``manifest`` is not a usable page manifest of ``doc_id``, or None (what the vlm stage reads)."""
    if not isinstance(manifest, Mapping):
        return f"{_shape(manifest)}, not a page manifest"
    if "doc_id" in manifest and manifest["doc_id"] != doc_id:
        return f"it is the page manifest of document {manifest['doc_id']!r}, not {doc_id!r}"
    pages = manifest.get("pages")
    if not isinstance(pages, list):
        return "no 'pages' list"
    for entry in pages:
        if isinstance(entry, Mapping) and entry.get("route") == "text":
            # a text-route page: no image; its result was written by parsed_pages under the text engine
            if not (
                _is_int(entry.get("page"))
                and isinstance(entry.get("cache_key"), str)
                and isinstance(entry.get("engine"), str)
            ):
                return f"a text-route page entry lacks its page number, cache_key or engine: {str(entry)[:120]}"
            continue
        if not (
            isinstance(entry, Mapping)
            and _is_int(entry.get("page"))
            and isinstance(entry.get("png_key"), str)
            and isinstance(entry.get("png_sha256"), str)
        ):
            return f"a page entry lacks its page number, png_key or png_sha256: {str(entry)[:120]}"
    failed = manifest.get("failed_pages", [])
    if not isinstance(failed, list) or not all(isinstance(f, Mapping) and _is_int(f.get("page")) for f in failed):
        return "'failed_pages' is not a list of failures with their page numbers"
    return None


def read_page_record(
    data: bytes, *, doc_id: str, page: int, cache_key: str, engine: str
) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) if ``data`` is the valid page result of its key, else (None, the problem)."""
    record, problem = parse_json(data)
    if problem is None:
        problem = page_record_problem(record, doc_id=doc_id, page=page, cache_key=cache_key, engine=engine)
    return (record, None) if problem is None else (None, problem)


def read_status(data: bytes, *, doc_id: str) -> tuple[dict[str, Any] | None, str | None]:
    """(status, None) if ``data`` is a valid status.json of ``doc_id``, else (None, the problem)."""
    status, problem = parse_json(data)
    if problem is None:
        problem = status_problem(status, doc_id=doc_id)
    return (status, None) if problem is None else (None, problem)


def read_page_manifest(data: bytes, *, doc_id: str) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) if ``data`` is a usable page manifest of ``doc_id``, else (None, the problem)."""
    manifest, problem = parse_json(data)
    if problem is None:
        problem = page_manifest_problem(manifest, doc_id=doc_id)
    return (manifest, None) if problem is None else (None, problem)


# ---- page routes (issue 19): a manifest page's result, whichever route it took -------------------------------


def is_text_page(page: Mapping[str, Any]) -> bool:
    """Whether a manifest entry took the text route (its result was written by parsed_pages; no image)."""
    return page.get("route") == "text"


def page_result_cache_key(page: Mapping[str, Any], identity: str) -> str:
    """The cache key of a manifest page's result: a text page's own (its text engine's), else the page
    image's under the VLM engine ``identity``."""
    from mkg_pipeline.engines.base import page_cache_key

    if is_text_page(page):
        return str(page["cache_key"])
    return page_cache_key(str(page["png_sha256"]), identity)


def page_result_identity(page: Mapping[str, Any], identity: str) -> str:
    """The engine identity a manifest page's result is recorded under (a text page: the text engine's)."""
    return str(page["engine"]) if is_text_page(page) else identity
