"""Ingestion batches: the unit of Dagster partitioning.

One dynamic partition per PDF would not scale (Dagster's partition store and
UI degrade past tens of thousands of partitions), so the sensor groups new
objects of ``incoming/`` into batches of up to ``workers.batch_size``. A batch
manifest ``batches/<batch_id>.json`` records the objects (key + ETag) and, once
``raw_pdfs`` ran, what became of each: the per-document status lives in S3,
not in the partition store.

The stages work on a batch's documents in worker processes (:func:`document_pool`); each worker reaches
the bucket with its own client (:func:`storage_for`), so document bytes and page images never travel
between processes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mkg_pipeline.config import StorageConfig, WorkersConfig
    from mkg_pipeline.pdf.pool import InlinePool, WorkerPool
    from mkg_pipeline.storage import Storage

BATCH_MANIFEST_VERSION = 1


@dataclass(frozen=True)
class IncomingObject:
    key: str
    etag: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "etag": self.etag, "size": self.size}


def new_batch_id(objects: list[IncomingObject], now: datetime | None = None) -> str:
    """Stable for the same objects (key + ETag), readable in the UI, sortable by time."""
    digest = hashlib.sha256("\n".join(f"{o.key}\t{o.etag}" for o in sorted(objects, key=lambda o: o.key)).encode())
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S")
    return f"b{stamp}-{digest.hexdigest()[:8]}"


def write_batch_manifest(storage: Storage, batch_id: str, objects: list[IncomingObject], origin: str) -> None:
    storage.put_json(
        storage.batch_key(batch_id),
        {
            "version": BATCH_MANIFEST_VERSION,
            "batch_id": batch_id,
            "created_at": datetime.now(UTC).isoformat(),
            "origin": origin,
            "objects": [o.to_json() for o in objects],
            "results": {},
        },
    )


class BatchManifestInvalid(ValueError):
    """A batch manifest that parses as JSON but is not a batch manifest (a ``ValueError``, like bytes that do not
    parse): the stage says which object and what is wrong instead of failing on it with an ``AttributeError``."""


def read_batch_manifest(storage: Storage, batch_id: str) -> dict[str, Any]:
    """The manifest of batch ``batch_id``, checked for the shape every stage relies on.

    Raises ``FileNotFoundError`` when there is none, ``ValueError`` ("is not valid JSON") when its bytes do not
    parse, and :class:`BatchManifestInvalid` when they parse to something else than a batch manifest.
    """
    key = storage.batch_key(batch_id)
    try:
        manifest = storage.get_json(key)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"batch {batch_id!r} has no manifest at {storage.uri(key)}; "
            "batches are created by the incoming_pdfs_sensor (daemon) "
            "or `python -m mkg_pipeline.orchestration.batch_cli`"
        ) from None
    problem = manifest_problem(manifest, batch_id)
    if problem is not None:
        raise BatchManifestInvalid(
            f"{storage.uri(key)} is not a valid batch manifest: {problem}. The batch cannot be processed until "
            "the record is restored (its objects not yet ingested are still in incoming/, where a new batch "
            "picks them up once this one is removed)"
        )
    return manifest  # type: ignore[no-any-return]


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def manifest_problem(manifest: Any, batch_id: str) -> str | None:
    """What is wrong with the parsed ``manifest`` of ``batch_id``, or None when it has a batch manifest's shape.

    Only the fields the stages read are checked (unknown fields are left alone, for newer writers).
    """
    if not isinstance(manifest, dict):
        return f"expected a JSON object, found {_kind(manifest)}"
    if manifest.get("batch_id", batch_id) != batch_id:
        return f"it is the manifest of batch {manifest['batch_id']!r}"
    if "objects" not in manifest and "doc_ids" not in manifest:
        return "it lists neither objects nor doc_ids"
    objects = manifest.get("objects", [])
    if not isinstance(objects, list):
        return f"objects is {_kind(objects)}, not a list"
    for index, obj in enumerate(objects):
        if not isinstance(obj, dict):
            return f"objects[{index}] is {_kind(obj)}, not an object"
        for name, kinds in (("key", str), ("etag", str), ("size", int)):
            value = obj.get(name)
            if name == "size" and name not in obj:
                continue  # older manifests
            if not isinstance(value, kinds) or isinstance(value, bool):
                return f"objects[{index}].{name} is {_kind(value)}, not {kinds.__name__}"
    results = manifest.get("results", {})
    if not isinstance(results, dict):
        return f"results is {_kind(results)}, not an object"
    for key, result in results.items():
        if not isinstance(result, dict) or not isinstance(result.get("status"), str):
            return f"results[{key!r}] is {_kind(result)}, not an object with a status"
        if result["status"] == "accepted" and not isinstance(result.get("doc_id"), str):
            return f"results[{key!r}] is accepted without a doc_id"
    doc_ids = manifest.get("doc_ids", [])
    if not isinstance(doc_ids, list) or not all(isinstance(d, str) for d in doc_ids):
        return "doc_ids is not a list of document ids"
    return None


def accepted_doc_ids(manifest: dict[str, Any], only: list[str] | None = None) -> list[str]:
    """Distinct documents a batch accepted, in manifest order, optionally restricted to ``only``."""
    seen: dict[str, None] = {}
    for result in manifest.get("results", {}).values():
        if result.get("status") == "accepted":
            seen.setdefault(result["doc_id"], None)
    for doc_id in manifest.get("doc_ids", []):  # golden batches list documents directly
        seen.setdefault(doc_id, None)
    doc_ids = list(seen)
    if only:
        missing = sorted(set(only) - set(doc_ids))
        if missing:
            raise ValueError(
                f"batch {manifest.get('batch_id')!r} holds no accepted document {', '.join(missing)}; "
                f"it holds: {', '.join(doc_ids) or 'none'}"
            )
        doc_ids = [d for d in doc_ids if d in set(only)]
    return doc_ids


# ---- worker processes -----------------------------------------------------------------------------------

#: a worker's own Storage per bucket config, built on its first task and reused for the next ones
_worker_storages: dict[tuple[Any, ...], tuple[int, Storage]] = {}


def storage_for(target: Storage | StorageConfig) -> Storage:
    """The Storage a task works with: the caller's own (in-process runs) or, in a worker process, one built
    from the config once per process (a new S3 client costs tens of milliseconds; tasks reuse it)."""
    from mkg_pipeline.storage import Storage

    if isinstance(target, Storage):
        return target
    secret = target.secret_access_key.get_secret_value() if target.secret_access_key else None
    key = (target.endpoint_url, target.bucket, target.access_key_id, secret, target.region)
    cached = _worker_storages.get(key)
    if cached is None or cached[0] != os.getpid():
        cached = (os.getpid(), Storage.from_config(target))
        _worker_storages[key] = cached
    return cached[1]


def document_pool(
    storage: Storage, workers: WorkersConfig, documents: int, *, preload: tuple[str, ...] = ()
) -> tuple[WorkerPool[str] | InlinePool[str], Storage | StorageConfig]:
    """The pool a stage runs its per-document tasks in, and what the tasks get to reach the bucket.

    A bucket other processes can reach (``storage.config`` set) is worked on in worker processes, at most
    one per CPU available (``workers.render_processes`` overrides), each task limited to
    ``workers.timeout_s``. In-memory storage (stage tests) cannot be shared with other processes: its tasks
    run in this process, without the time limit.
    """
    from mkg_pipeline.pdf.pool import InlinePool, WorkerPool, pool_size  # pymupdf: only where work runs

    if storage.config is None:
        return InlinePool(), storage
    processes = pool_size(workers.render_processes, documents)
    # The tasks are functions of the preloaded stage modules: the workers need not re-run the parent's main
    # script (in a run pod, Dagster's console script: all of Dagster imported once more per worker).
    return WorkerPool(processes, workers.timeout_s, preload=preload, import_parent_main=False), storage.config
