"""Promotion: make a batch's current outputs the golden baseline, and register the golden batch.

``promote_batch`` chooses the documents (by id, or by source file name, default the configured
``quality.golden_set``), copies their page outputs into ``baseline/<set>/<doc_id>/`` (refusing a
document that is not complete for the engine identity) and records the golden set as a batch of its
own, ``batches/golden-<set>.json`` holding ``doc_ids``, so that the daily baseline job runs the same
assets over it. The Dagster side (``promote_baseline_job`` in ``jobs.py``) only registers the partition.

Importing this module is cheap (the code location imports it for ``golden_partition``); the storage
and quality code is imported when a promotion runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mkg_pipeline.storage import Storage

log = logging.getLogger(__name__)

GOLDEN_PREFIX = "golden-"


class PromotionError(ValueError):
    """The requested documents cannot be promoted (not in the batch, or incomplete)."""


def golden_partition(set_name: str) -> str:
    """The batch (partition) holding the golden set ``set_name``."""
    return f"{GOLDEN_PREFIX}{set_name}"


@dataclass(frozen=True)
class Promotion:
    promoted: dict[str, int]  # doc_id -> pages copied
    golden_batch: str


def select_documents(
    manifest: dict[str, Any], *, doc_ids: list[str] | None = None, sources: list[str] | None = None
) -> list[str]:
    """The batch's accepted documents to promote: ``doc_ids`` if given, else those whose source name is in
    ``sources`` (an empty list: every accepted document)."""
    from mkg_pipeline.stages.batches import accepted_doc_ids

    if doc_ids:
        try:
            return accepted_doc_ids(manifest, doc_ids)
        except ValueError as exc:
            raise PromotionError(str(exc)) from None
    by_source = {
        key.rsplit("/", 1)[-1]: result["doc_id"]
        for key, result in (manifest.get("results") or {}).items()
        if result.get("status") == "accepted"
    }
    chosen = (
        list(dict.fromkeys(by_source.values())) if not sources else [by_source[s] for s in sources if s in by_source]
    )
    if not chosen:
        raise PromotionError(
            f"batch {manifest.get('batch_id')} holds none of {sources}; it holds {sorted(by_source) or 'no document'}"
        )
    return chosen


def register_golden_batch(storage: Storage, set_name: str, doc_ids: list[str], origin: str) -> str:
    """Add ``doc_ids`` to the golden batch of ``set_name`` (created if needed); returns its partition key."""
    partition = golden_partition(set_name)
    key = storage.batch_key(partition)
    previous = storage.get_json(key) if storage.exists(key) else {"doc_ids": []}
    storage.put_json(
        key,
        {
            "batch_id": partition,
            "origin": f"promote_baseline from {origin}",
            "objects": [],
            "results": {},
            "doc_ids": list(dict.fromkeys([*previous.get("doc_ids", []), *doc_ids])),
        },
    )
    return partition


def promote_batch(
    storage: Storage,
    batch_id: str,
    identity: str,
    *,
    doc_ids: list[str] | None = None,
    sources: list[str] | None = None,
    set_name: str = "default",
) -> Promotion:
    """Promote documents of ``batch_id`` to the baseline ``set_name``; raises :class:`PromotionError`."""
    from mkg_pipeline.stages.batches import read_batch_manifest

    chosen = select_documents(read_batch_manifest(storage, batch_id), doc_ids=doc_ids, sources=sources)
    try:
        promoted = promote_to_baseline(storage, chosen, identity, set_name, origin=batch_id)
    except (ValueError, FileNotFoundError) as exc:
        raise PromotionError(str(exc)) from None
    golden = register_golden_batch(storage, set_name, list(promoted), origin=batch_id)
    log.info("promoted %s to baseline set %s; golden batch %s", promoted, set_name, golden)
    return Promotion(promoted=promoted, golden_batch=golden)


def promote_to_baseline(
    storage: Storage, doc_ids: list[str], identity: str, baseline_set: str, origin: str
) -> dict[str, int]:
    """Copy the current outputs of ``doc_ids`` into the golden baseline; refuses incomplete documents."""

    from mkg_pipeline.quality.diff import baseline_page_key
    from mkg_pipeline.records import page_result_cache_key
    from mkg_pipeline.stages.pages import read_page_manifest

    promoted: dict[str, int] = {}
    for doc_id in doc_ids:
        manifest = read_page_manifest(storage, doc_id)
        outputs: dict[int, str] = {}
        for page in manifest["pages"]:
            key = storage.vlm_page_key(doc_id, page["page"], page_result_cache_key(page, identity))
            try:
                outputs[page["page"]] = storage.get_json(key)["markdown"]
            except FileNotFoundError:
                raise ValueError(
                    f"document {doc_id} ({manifest.get('source')}) page {page['page']} has no output for "
                    f"{identity}; materialize vlm_outputs until it is complete before promoting it"
                ) from None
        for n, markdown in outputs.items():
            storage.put_bytes(baseline_page_key(storage, baseline_set, doc_id, n), markdown.encode(), "text/markdown")
        storage.put_json(
            storage.baseline_key(baseline_set, doc_id, "meta.json"),
            {
                "doc_id": doc_id,
                "source": manifest.get("source"),
                "engine": identity,
                "pages": len(outputs),
                "origin": origin,
                "promoted_at": datetime.now(UTC).isoformat(),
            },
        )
        promoted[doc_id] = len(outputs)
        log.info("promoted %s (%d pages) to baseline set %s", doc_id, len(outputs), baseline_set)
    return promoted
