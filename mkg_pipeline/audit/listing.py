"""The bucket's documents, one at a time: the keys under ``raw/``, ``pages/`` and ``vlm/`` merged by document id."""

from __future__ import annotations

import heapq
import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from mkg_pipeline.audit.report import WARNING, AuditReport, Finding
from mkg_pipeline.storage import ObjectInfo, Storage

_DOC_ID = re.compile(r"^[0-9a-f]{16}$")


@dataclass
class _DocKeys:
    doc_id: str
    raw: set[str] = field(default_factory=set)  # "pdf", "json"
    pages: set[str] = field(default_factory=set)  # names under pages/<doc>/
    vlm: set[str] = field(default_factory=set)  # names under vlm/<doc>/
    vlm_etags: dict[str, str] = field(default_factory=dict)  # name under vlm/<doc>/ -> its listed ETag


def _split(key: str, prefix: str) -> tuple[str, str] | None:
    """(doc_id, rest) of ``<prefix><doc_id>/<rest>``; ``raw/<doc_id>.<ext>`` gives (doc_id, ext)."""
    tail = key[len(prefix) :]
    if prefix == "raw/":
        doc_id, dot, ext = tail.rpartition(".")
        return (doc_id, ext) if dot else None
    doc_id, slash, rest = tail.partition("/")
    return (doc_id, rest) if slash else None


def _stream_documents(storage: Storage, raw: dict[str, int], report: AuditReport) -> Iterator[_DocKeys]:
    """Every document with any object under raw/, pages/ or vlm/, merged by doc_id (listings are sorted)."""
    raw_stream = (
        (d, "raw/", [(n, "") for bit, n in ((1, "pdf"), (2, "json")) if flags & bit])
        for d, flags in sorted(raw.items())
    )
    streams = [raw_stream, *(_grouped_stream(storage.list_objects(p), p, report) for p in ("pages/", "vlm/"))]
    merged = heapq.merge(*streams, key=lambda item: item[0])
    for doc_id, parts in itertools.groupby(merged, key=lambda item: item[0]):
        doc = _DocKeys(doc_id)
        for _, prefix, names in parts:
            {"raw/": doc.raw, "pages/": doc.pages, "vlm/": doc.vlm}[prefix].update(name for name, _ in names)
            if prefix == "vlm/":
                doc.vlm_etags.update(names)
        yield doc


def _unexpected(key: str, prefix: str, report: AuditReport) -> None:
    report.add(
        Finding(
            "unexpected_key",
            WARNING,
            key,
            f"not a key of the layout under {prefix} (document ids are 16 hex characters)",
            "find out what wrote it; the pipeline never reads it",
        )
    )


def _list_raw(storage: Storage, report: AuditReport) -> dict[str, int]:
    raw: dict[str, int] = {}
    for obj in storage.list_objects("raw/"):
        split = _split(obj.key, "raw/")
        if split is None or not _DOC_ID.match(split[0]) or split[1] not in {"pdf", "json"}:
            _unexpected(obj.key, "raw/", report)
            continue
        raw[split[0]] = raw.get(split[0], 0) | (1 if split[1] == "pdf" else 2)
    return raw


def _grouped_stream(
    objects: Iterable[ObjectInfo], prefix: str, report: AuditReport
) -> Iterator[tuple[str, str, list[tuple[str, str]]]]:
    """(doc_id, prefix, (name, ETag) under it) per document, in listing (= doc_id) order, one at a time."""

    def parsed() -> Iterator[tuple[str, str, str]]:
        for obj in objects:
            split = _split(obj.key, prefix)
            if split is None or not _DOC_ID.match(split[0]):
                _unexpected(obj.key, prefix, report)
                continue
            yield split[0], split[1], obj.etag

    for doc_id, group in itertools.groupby(parsed(), key=lambda s: s[0]):
        yield doc_id, prefix, [(rest, etag) for _, rest, etag in group]
