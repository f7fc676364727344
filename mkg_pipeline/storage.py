"""The bucket every artefact lives in: key layout, reads and (atomic) writes, over s3fs.

Layout (docs/architecture.md, "Storage layout"), all keys relative to the one bucket:

=============================================  ======================================================
``incoming/<name>``                            dropped PDFs; the sensor lists this prefix
``raw/<doc_id>.pdf``, ``raw/<doc_id>.json``      accepted PDF (doc_id = sha256[:16] of its bytes), its metadata
``pages/<doc_id>/<n>.png``                     rendered page ``n`` (1-based)
``pages/<doc_id>/manifest.json``               page sizes, image hashes, text layer (written last)
``pages/<doc_id>/failure.json``                why the whole document could not be rendered
``vlm/<doc_id>/pages/<n>.<cache_key>.json``      one page's VLM result
``vlm/<doc_id>/images/<sha256>.jpg``             figure crops, content-addressed
``vlm/<doc_id>/document.md``, ``content_list.json``, ``status.json``  assembled outputs, status
``rejected/<sanitized name>.json``             why an input was refused (original name inside)
``batches/<batch_id>.json``                    ingestion batch manifest
``leases/<batch_id>.json``                     the run that currently owns a batch
``baseline/<set>/<doc_id>/...``                golden outputs
``quality/<date>/...``                         quality diff reports
=============================================  ======================================================

Keys are S3 keys, used literally: ``incoming/report.pdf?versionId=x`` is that object, never
``incoming/report.pdf`` (s3fs's path methods parse such suffixes, so objects are reached through the
aiobotocore client s3fs exposes, with an explicit ``Key``; :class:`_S3Ops`).

Atomicity: every write is one PutObject. S3, MinIO and moto make an object visible only when the PUT
succeeds, so a killed writer never leaves a half object that looks finished, and a reader sees either
the old or the new version of a key. Conditional writes (``if_none_match`` / ``if_match``) let a
writer claim a key or replace exactly the version it read (the batch lease uses them).

Draining ``incoming/`` without losing a new version (issue 21): an ingested object is removed with
:meth:`Storage.drain`, which deletes exactly the version that was batched and never a newer one uploaded
under the same name in between. An unconditional DELETE cannot promise that: the name is checked, then
deleted, and a new version landing in between is deleted unprocessed. Two mechanisms close the gap, and
:meth:`Storage.drain_strategy` picks, once per Storage, the first one this bucket honours:

1. ``version_id``, a versioned bucket (GetBucketVersioning says ``Enabled``): the drain lists the key's
   versions, deletes the batched one by its version id (and the older, superseded ones first, so none of
   them becomes current again), and a version uploaded meanwhile is another version id, never touched.
   AWS S3 and MinIO both implement versioning and DeleteObject by VersionId (MinIO on its erasure-coded
   and single-drive backends, not the legacy filesystem mode); moto too. This is the one to use on
   MinIO: deploy/ versions ``incoming/`` there, every other prefix excluded.
2. ``if_match``, DeleteObject with ``If-Match: <ETag>``: S3 deletes only if the current version still has
   that ETag, atomically (AWS general purpose buckets since 2025-09; moto). MinIO **ignores** the header
   and deletes anyway (minio/minio#21677), so it is trusted only after a probe: a scratch object under
   ``probes/`` is deleted with a wrong ETag, and the server must refuse (412) and keep it.
3. otherwise ``keep``: nothing is deleted from ``incoming/``. Ingested objects stay there, recorded with
   their key and ETag (the batch manifest marks them ``kept_in_incoming``), so the sensor, the audit and a
   re-run know them as done. Nothing is lost; incoming/ grows until versioning is enabled, and the
   audit says so.

Reads that must see the version that was checked use ``If-Match`` on GetObject (honoured by AWS, MinIO
and moto alike): :meth:`Storage.get_bytes` with ``if_match`` raises :class:`PreconditionFailed` when the
object was replaced, so a HEAD-then-GET never pairs one version's ETag with another's bytes.

Two faces over one set of operations:

- :class:`Storage`, synchronous, for the sensor, ingest, rendering, audit and tools;
- :class:`AsyncStorage` from ``async with storage.session()``, for the page path, where hundreds of
  GETs and PUTs are in flight at once: a pooled async client on the caller's event loop, no thread hop
  per call.

Both run the same coroutines of a backend: :class:`S3Backend` (s3fs/aiobotocore) or
:class:`MemoryBackend` (a dict, for fast in-process tests; :class:`MemoryStorage`).

No Dagster here: the Dagster resource in ``resources.py`` only builds a :class:`Storage`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Final, Protocol

from mkg_pipeline.config import StorageConfig
from mkg_pipeline.ids import doc_id_for

log = logging.getLogger(__name__)

__all__ = [
    "DRAIN_STRATEGIES",
    "AsyncStorage",
    "MemoryBackend",
    "MemoryStorage",
    "ObjectInfo",
    "ObjectVersion",
    "PreconditionFailed",
    "Storage",
    "doc_id_for",
    "json_bytes",
    "sanitize_source_name",
]

#: S3 allows 1024 bytes per key; names are cut well below so prefixes and suffixes always fit
_MAX_NAME_CHARS: Final = 180
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
#: ListObjectsV2 page size (the S3 maximum)
_LIST_PAGE_SIZE: Final = 1000
#: connections of one async session: the page path keeps this many GETs/PUTs in flight at most
ASYNC_POOL_CONNECTIONS: Final = 64

#: how :meth:`Storage.drain` removes an ingested object (module doc, "Draining incoming/")
BY_VERSION_ID: Final = "version_id"
BY_IF_MATCH: Final = "if_match"
KEEP: Final = "keep"
DRAIN_STRATEGIES: Final = (BY_VERSION_ID, BY_IF_MATCH, KEEP)
#: what :meth:`Storage.drain` did: removed it; removed nothing, or only the batched version, and a newer
#: version waits under the key; no version with that ETag exists; nothing removed (strategy ``keep``)
DRAINED: Final = "drained"
NEWER_WAITS: Final = "newer_waits"
NOT_FOUND: Final = "not_found"
KEPT: Final = "kept"
#: where the conditional-delete probe writes its scratch object (no stage lists this prefix)
PROBE_PREFIX: Final = "probes/"
_WRONG_ETAG: Final = "0" * 32


class PreconditionFailed(Exception):
    """A conditional write lost: the key exists (``if_none_match``) or changed (``if_match``)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object as listed: ``key`` relative to the bucket, ``etag`` without the surrounding quotes."""

    key: str
    size: int
    etag: str
    last_modified: datetime | None
    content_type: str | None = None
    version_id: str | None = None  # from HEAD, on a versioned bucket


@dataclass(frozen=True)
class ObjectVersion:
    """One version of a key (ListObjectVersions), newest first in :meth:`Storage.list_versions`."""

    version_id: str
    etag: str
    is_latest: bool


def json_bytes(obj: Any) -> bytes:
    """The JSON encoding every record is stored in (UTF-8; lone surrogates refused with a clear error)."""
    return json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8")


def sanitize_source_name(name: str) -> str:
    """A key-safe version of a dropped file's name, for ``rejected/<name>.json``.

    Keeps ``[A-Za-z0-9._-]``, replaces any other run of characters (slashes, spaces, non-ASCII) with ``_``,
    never starts with a dot and is at most 180 characters. When anything had to change, a short hash of
    the original name is appended, so two different names never share a key (``a b.pdf`` vs ``a_b.pdf``).
    The original name belongs in the JSON body.
    """
    safe = _SAFE_NAME.sub("_", name).lstrip(".")
    if safe == name and 0 < len(safe) <= _MAX_NAME_CHARS:
        return safe
    suffix = "-" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return (safe[: _MAX_NAME_CHARS - len(suffix)] or "unnamed") + suffix


def _segment(value: str, what: str) -> str:
    """One path segment of a key built from outside input: refuse anything that would change the layout."""
    if not value or "/" in value or value in {".", ".."}:
        raise ValueError(f"invalid {what} {value!r} for an S3 key segment: must be non-empty and contain no '/'")
    return value


def _page_number(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"page numbers are 1-based integers, got {n!r}")
    return n


def _relative_path(parts: tuple[str, ...], what: str) -> str:
    """Join extra key parts below a fixed prefix; a trailing '/' is kept so the result can be a listing prefix."""
    path = "/".join(p.strip("/") for p in parts if p.strip("/"))
    if any(seg in {".", ".."} for seg in path.split("/")):
        raise ValueError(f"invalid {what} {'/'.join(parts)!r}: '.' and '..' are not allowed")
    if path and parts and parts[-1].endswith("/"):
        path += "/"
    return path


def _check_key(key: str) -> str:
    if not key or key.startswith(("/", "s3://")):
        raise ValueError(f"keys are relative to the bucket, got {key!r}")
    return key


class Layout:
    """The project's key layout in one bucket (docs/architecture.md). Keys never start with '/' or 's3://'."""

    incoming_prefix: Final = "incoming/"

    bucket: str

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def raw_key(self, doc_id: str) -> str:
        return f"raw/{_segment(doc_id, 'doc_id')}.pdf"

    def raw_meta_key(self, doc_id: str) -> str:
        """Metadata of an accepted PDF (source name, pages, sha256), next to it."""
        return f"raw/{_segment(doc_id, 'doc_id')}.json"

    def page_prefix(self, doc_id: str) -> str:
        return f"pages/{_segment(doc_id, 'doc_id')}/"

    def page_png_key(self, doc_id: str, n: int) -> str:
        return f"{self.page_prefix(doc_id)}{_page_number(n)}.png"

    def page_manifest_key(self, doc_id: str) -> str:
        return f"{self.page_prefix(doc_id)}manifest.json"

    def render_failure_key(self, doc_id: str) -> str:
        """Why a whole document could not be rendered (timeout, unreadable), with attempts."""
        return f"{self.page_prefix(doc_id)}failure.json"

    def vlm_prefix(self, doc_id: str) -> str:
        return f"vlm/{_segment(doc_id, 'doc_id')}/"

    def vlm_page_prefix(self, doc_id: str) -> str:
        return f"{self.vlm_prefix(doc_id)}pages/"

    def vlm_page_key(self, doc_id: str, n: int, cache_key: str) -> str:
        return f"{self.vlm_page_prefix(doc_id)}{_page_number(n)}.{_segment(cache_key, 'cache_key')}.json"

    def vlm_image_key(self, doc_id: str, name: str) -> str:
        """A figure crop: ``name`` is ``<sha256>.jpg`` (or ``images/<sha256>.jpg`` as Markdown links it)."""
        return f"{self.vlm_prefix(doc_id)}images/{_segment(name.removeprefix('images/'), 'image name')}"

    def document_md_key(self, doc_id: str) -> str:
        return f"{self.vlm_prefix(doc_id)}document.md"

    def content_list_key(self, doc_id: str) -> str:
        """MinerU's content list of the document (``<name>_content_list.json`` in MinerU's own output)."""
        return f"{self.vlm_prefix(doc_id)}content_list.json"

    def vlm_status_key(self, doc_id: str) -> str:
        """Per-document status manifest (pages done/failed, model, timestamps)."""
        return f"{self.vlm_prefix(doc_id)}status.json"

    def rejected_key(self, source_name: str) -> str:
        return f"rejected/{sanitize_source_name(source_name)}.json"

    def batch_key(self, batch_id: str) -> str:
        return f"batches/{_segment(batch_id, 'batch_id')}.json"

    def lease_key(self, batch_id: str) -> str:
        return f"leases/{_segment(batch_id, 'batch_id')}.json"

    def baseline_key(self, set_name: str, doc_id: str, *parts: str) -> str:
        """``baseline/<set>/<doc_id>/<parts...>``; without parts (or with a trailing '/') it is a prefix."""
        base = f"baseline/{_segment(set_name, 'baseline set')}/{_segment(doc_id, 'doc_id')}/"
        return base + _relative_path(parts, "baseline path")

    def quality_report_key(self, day: date | str, *parts: str) -> str:
        """``quality/<YYYY-MM-DD>/<parts...>``; without parts it is the day's prefix."""
        stamp = day.isoformat()[:10] if isinstance(day, date) else _segment(day, "report date")
        return f"quality/{stamp}/" + _relative_path(parts, "report path")


# ---- backends: the object operations, as coroutines ----------------------------------------------------


class Ops(Protocol):
    """The operations one backend session offers (keys already checked, relative to the bucket)."""

    async def get(self, key: str, if_match: str | None = None) -> bytes: ...
    async def put(
        self, key: str, data: bytes, content_type: str | None, if_none_match: bool, if_match: str | None
    ) -> str: ...
    async def head(self, key: str) -> ObjectInfo | None: ...
    async def delete(self, keys: list[str]) -> None: ...
    async def delete_one(self, key: str, if_match: str | None, version_id: str | None) -> None: ...
    async def list_versions(self, key: str) -> list[ObjectVersion]: ...
    async def versioned(self) -> bool: ...
    async def copy(self, src: str, dst: str) -> None: ...
    async def list_page(self, prefix: str, token: str | None) -> tuple[list[ObjectInfo], str | None]: ...
    async def ensure_bucket(self) -> None: ...


class _S3Ops:
    """The operations over one s3fs filesystem (sync instance on fsspec's loop, or an async one).

    Object requests go to the aiobotocore client that s3fs hands out publicly (``await fs.set_session()``),
    not through s3fs's path methods: those parse what they are given (``report.pdf?versionId=x`` becomes a
    version of ``report.pdf``, ``*`` and ``[`` are globs, a missing key with objects below it is a
    "directory"), and keys here are literal (module doc). The conditional and versioned requests
    (If-None-Match, If-Match, VersionId) have no s3fs method at all. Listings use aiobotocore's paginators.
    Each request keeps s3fs's retry policy and error translation (:func:`_s3_request`).
    """

    def __init__(self, fs: Any, bucket: str, region: str) -> None:
        self.fs = fs
        self.bucket = bucket
        self.region = region

    async def _request(self, send: Callable[[Any], Awaitable[Any]]) -> Any:
        # set_session returns the filesystem's one client, and makes a new one if its connections were closed
        client = await self.fs.set_session()
        return await _s3_request(lambda: send(client), attempts=self.fs.retries)

    async def get(self, key: str, if_match: str | None = None) -> bytes:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if if_match:
            kwargs["IfMatch"] = f'"{if_match}"'
        try:
            response = await self._request(lambda s3: s3.get_object(**kwargs))
        except OSError as exc:
            if if_match and not isinstance(exc, FileNotFoundError) and _is_412(exc):
                raise PreconditionFailed(f"{key} is no longer the version with ETag {if_match}: {exc}") from None
            raise
        body = response["Body"]
        try:
            return bytes(await body.read())
        finally:
            body.close()

    async def put(
        self, key: str, data: bytes, content_type: str | None, if_none_match: bool, if_match: str | None
    ) -> str:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": bytes(data)}
        if content_type:
            kwargs["ContentType"] = content_type
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match:
            kwargs["IfMatch"] = f'"{if_match}"'
        try:
            response = await self._request(lambda s3: s3.put_object(**kwargs))
        except (FileExistsError, OSError) as exc:
            # 412 becomes FileExistsError (If-None-Match) or OSError(EINVAL) (If-Match); a missing object
            # under If-Match is a 404. Only a conditional write can lose this way.
            if (if_none_match or if_match) and (isinstance(exc, FileExistsError | FileNotFoundError) or _is_412(exc)):
                raise PreconditionFailed(f"conditional write of {key} lost: {exc}") from None
            raise
        return str(response.get("ETag", "")).strip('"')

    async def head(self, key: str) -> ObjectInfo | None:
        try:
            response = await self._request(lambda s3: s3.head_object(Bucket=self.bucket, Key=key))
        except FileNotFoundError:
            return None
        return ObjectInfo(
            key=key,
            size=int(response.get("ContentLength", 0)),
            etag=str(response.get("ETag", "")).strip('"'),
            last_modified=response.get("LastModified"),
            content_type=response.get("ContentType"),
            version_id=response.get("VersionId"),
        )

    async def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            delete = {"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True}
            await self._request(lambda s3, d=delete: s3.delete_objects(Bucket=self.bucket, Delete=d))

    async def delete_one(self, key: str, if_match: str | None, version_id: str | None) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if if_match:
            kwargs["IfMatch"] = f'"{if_match}"'
        if version_id:
            kwargs["VersionId"] = version_id
        try:
            await self._request(lambda s3: s3.delete_object(**kwargs))
        except OSError as exc:
            # With If-Match, S3 answers 412 when the current version has another ETag and 404 when there is
            # no object (OSError / FileNotFoundError); a plain DELETE of a missing key succeeds.
            if if_match and not isinstance(exc, FileNotFoundError) and _is_412(exc):
                raise PreconditionFailed(f"conditional delete of {key} lost: {exc}") from None
            raise

    async def list_versions(self, key: str) -> list[ObjectVersion]:
        async def every_version(s3: Any) -> list[ObjectVersion]:
            pages = s3.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=key)
            return [
                ObjectVersion(str(v["VersionId"]), str(v.get("ETag", "")).strip('"'), bool(v.get("IsLatest")))
                async for page in pages
                for v in page.get("Versions", [])
                if v.get("Key") == key  # the prefix also matches longer names
            ]

        # One key's versions are a page or two: a transient failure lists them again from the start.
        return await self._request(every_version)  # type: ignore[no-any-return]

    async def versioned(self) -> bool:
        # s3fs's is_bucket_versioned, awaited: fsspec names the coroutine form of each public method "_" + name
        return bool(await self.fs._is_bucket_versioned(self.bucket))

    async def copy(self, src: str, dst: str) -> None:
        source = {"Bucket": self.bucket, "Key": src}
        await self._request(lambda s3: s3.copy_object(Bucket=self.bucket, Key=dst, CopySource=source))

    async def list_page(self, prefix: str, token: str | None) -> tuple[list[ObjectInfo], str | None]:
        """Up to one S3 page of objects; ``token`` is the paginator's resume token from the previous call."""

        async def one_page(s3: Any) -> tuple[list[ObjectInfo], str | None]:
            config: dict[str, Any] = {"MaxItems": _LIST_PAGE_SIZE, "PageSize": _LIST_PAGE_SIZE}
            if token:
                config["StartingToken"] = token
            pages = s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, PaginationConfig=config
            )
            items = [
                ObjectInfo(
                    key=item["Key"],
                    size=int(item.get("Size", 0)),
                    etag=str(item.get("ETag", "")).strip('"'),
                    last_modified=item.get("LastModified"),
                )
                async for page in pages
                for item in page.get("Contents", [])
            ]
            # Set only when MaxItems stopped the paginator with more objects to come; None at the end.
            return items, pages.resume_token

        # A failed page is asked again from the same token (the paginator alone would not retry it: s3fs#982).
        return await self._request(one_page)  # type: ignore[no-any-return]

    async def ensure_bucket(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region and self.region != "us-east-1":  # us-east-1 refuses an explicit LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        # BucketAlreadyOwnedByYou/BucketAlreadyExists translate to FileExistsError. PermissionError: a
        # credential allowed to use but not create the bucket; head_bucket below tells whether it exists.
        # (s3fs's mkdir would send a LocationConstraint to us-east-1 too, which refuses it.)
        with contextlib.suppress(FileExistsError, PermissionError):
            await self._request(lambda s3: s3.create_bucket(**kwargs))
        await self._request(lambda s3: s3.head_bucket(Bucket=self.bucket))


#: ClientError texts s3fs retries besides its retryable exception types (throttling; a body that arrived
#: corrupted)
_RETRIED_CLIENT_ERRORS: Final = ("SlowDown", "reduce your request rate", "XAmzContentSHA256Mismatch")


async def _s3_request(
    send: Callable[[], Awaitable[Any]],
    *,
    attempts: int,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> Any:
    """``send()`` with the retry policy and error translation s3fs gives its own requests.

    s3fs applies them only inside its private ``_call_s3``; here they wrap a public client call, with s3fs's
    public pieces: the retryable exception types (``s3fs.core.S3_RETRYABLE_ERRORS``, read per call so
    ``s3fs.core.add_retryable_error`` counts) and ``translate_boto_error`` (NoSuchKey -> FileNotFoundError,
    AccessDenied -> PermissionError, If-None-Match lost -> FileExistsError, others OSError; the ClientError,
    with S3's answer, stays the ``__cause__``). botocore's own attempts (``AWS_MAX_ATTEMPTS``) run inside
    each of these, as they did under s3fs. An error that is no ClientError (S3 unreachable) is raised as is.
    """
    import s3fs.core
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    error: BaseException | None = None
    for attempt in range(max(1, attempts)):
        if attempt:
            await sleep(min(1.7 ** (attempt - 1) * 0.1, 15))  # s3fs's backoff
        try:
            return await send()
        except s3fs.core.S3_RETRYABLE_ERRORS as exc:
            error = exc
        except ClientError as exc:
            error = exc
            if not any(text in str(exc) for text in _RETRIED_CLIENT_ERRORS):
                break
    raise translate_boto_error(error)


def _answered(exc: BaseException) -> bool:
    """Whether S3 answered the request (with an error), rather than being unreachable."""
    return isinstance(getattr(exc.__cause__, "response", None), dict) or isinstance(
        getattr(exc, "response", None), dict
    )


def _is_412(exc: BaseException) -> bool:
    cause = exc.__cause__
    response = getattr(cause, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status == 412 or response.get("Error", {}).get("Code") == "PreconditionFailed"
    return "PreconditionFailed" in str(exc) or "412" in str(exc)


_session_lock = threading.Lock()
_session: tuple[int, Any] | None = None


def _shared_botocore_session() -> Any:
    """One aiobotocore session per process, shared by every Storage's own client.

    The session only loads and caches botocore's service models (endpoints, S3 API JSON); sharing it cuts
    the first request of a new Storage from about 300 ms to 80 ms. Clients, connections and credentials
    stay per Storage. Re-created after a fork so a child never inherits its parent's state.
    """
    from aiobotocore.session import AioSession

    global _session
    with _session_lock:
        if _session is None or _session[0] != os.getpid():
            _session = (os.getpid(), AioSession())
        return _session[1]


@dataclass
class S3Backend:
    """A bucket reached through s3fs: sync calls on fsspec's IO loop, async sessions on the caller's loop."""

    config: StorageConfig
    _fs: Any = None

    def _fs_kwargs(self, *, asynchronous: bool) -> dict[str, Any]:
        cfg = self.config
        client_kwargs: dict[str, Any] = {"region_name": cfg.region}
        config_kwargs: dict[str, Any] = {}
        if cfg.endpoint_url:
            client_kwargs["endpoint_url"] = cfg.endpoint_url
            # MinIO and moto serve buckets as paths; virtual-host style would need DNS for <bucket>.<host>.
            config_kwargs["s3"] = {"addressing_style": "path"}
        if asynchronous:
            config_kwargs["max_pool_connections"] = ASYNC_POOL_CONNECTIONS
        return {
            "key": cfg.access_key_id,
            "secret": cfg.secret_access_key.get_secret_value() if cfg.secret_access_key else None,
            "client_kwargs": client_kwargs,
            "config_kwargs": config_kwargs,
            # fsspec caches filesystem instances by constructor arguments and hands the same object to every
            # caller. A Storage owns its client instead: no state shared between configs, tests or restarts.
            "skip_instance_cache": True,
            "use_listings_cache": False,
            "asynchronous": asynchronous,
            "session": _shared_botocore_session(),
        }

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import s3fs

            self._fs = s3fs.S3FileSystem(**self._fs_kwargs(asynchronous=False))
        return self._fs

    def run(self, operation: Callable[[Ops], Any]) -> Any:
        from fsspec.asyn import sync

        fs = self.fs
        return sync(fs.loop, operation, _S3Ops(fs, self.config.bucket, self.config.region))

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Ops]:
        import s3fs

        fs = s3fs.S3FileSystem(**self._fs_kwargs(asynchronous=True))
        client = await fs.set_session()
        try:
            yield _S3Ops(fs, self.config.bucket, self.config.region)
        finally:
            await client.close()


@dataclass
class _MemoryObject:
    data: bytes
    etag: str
    content_type: str | None
    last_modified: datetime


@dataclass
class MemoryBackend:
    """A bucket in a dict, for in-process tests of the stages: same operations, same semantics.

    ``fault``, when set, is called as ``fault(op, key)`` before every operation (op is one of ``get``,
    ``put``, ``head``, ``delete``, ``copy``, ``list``); raising from it simulates S3 failing at exactly
    that point. ``calls`` counts operations by name.
    """

    objects: dict[str, _MemoryObject] = field(default_factory=dict)
    fault: Callable[[str, str], None] | None = None
    #: False: DeleteObject ignores If-Match and deletes anyway, as MinIO does (the ``keep`` drain strategy)
    honours_delete_if_match: bool = True
    calls: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _enter(self, op: str, key: str) -> None:
        with self._lock:
            self.calls[op] = self.calls.get(op, 0) + 1
        if self.fault is not None:
            self.fault(op, key)

    def run(self, operation: Callable[[Ops], Any]) -> Any:
        # Nothing here awaits anything: drive the coroutine to completion on this thread, no event loop.
        coroutine = operation(_MemoryOps(self))
        try:
            coroutine.send(None)
        except StopIteration as done:
            return done.value
        coroutine.close()
        raise RuntimeError("MemoryBackend operations never suspend")

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Ops]:
        yield _MemoryOps(self)


class _MemoryOps:
    def __init__(self, backend: MemoryBackend) -> None:
        self.b = backend

    async def get(self, key: str, if_match: str | None = None) -> bytes:
        self.b._enter("get", key)
        obj = self.b.objects.get(key)
        if obj is None:
            raise FileNotFoundError(key)
        if if_match and obj.etag != if_match:
            raise PreconditionFailed(f"{key} is no longer the version with ETag {if_match}")
        return obj.data

    async def put(
        self, key: str, data: bytes, content_type: str | None, if_none_match: bool, if_match: str | None
    ) -> str:
        self.b._enter("put", key)
        with self.b._lock:
            current = self.b.objects.get(key)
            if if_none_match and current is not None:
                raise PreconditionFailed(f"conditional write of {key} lost: the key exists")
            if if_match and (current is None or current.etag != if_match):
                raise PreconditionFailed(f"conditional write of {key} lost: its ETag changed")
            etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
            self.b.objects[key] = _MemoryObject(bytes(data), etag, content_type, datetime.now(UTC))
        return etag

    async def head(self, key: str) -> ObjectInfo | None:
        self.b._enter("head", key)
        obj = self.b.objects.get(key)
        if obj is None:
            return None
        return ObjectInfo(key, len(obj.data), obj.etag, obj.last_modified, obj.content_type)

    async def delete(self, keys: list[str]) -> None:
        for key in keys:
            self.b._enter("delete", key)
            with self.b._lock:
                self.b.objects.pop(key, None)

    async def delete_one(self, key: str, if_match: str | None, version_id: str | None) -> None:
        self.b._enter("delete", key)
        if version_id:
            raise NotImplementedError("the in-memory bucket has no versions")
        with self.b._lock:
            current = self.b.objects.get(key)
            if if_match and self.b.honours_delete_if_match:
                if current is None:
                    raise FileNotFoundError(key)
                if current.etag != if_match:
                    raise PreconditionFailed(f"conditional delete of {key} lost: its ETag changed")
            self.b.objects.pop(key, None)

    async def list_versions(self, key: str) -> list[ObjectVersion]:
        raise NotImplementedError("the in-memory bucket has no versions")

    async def versioned(self) -> bool:
        return False

    async def copy(self, src: str, dst: str) -> None:
        self.b._enter("copy", dst)
        with self.b._lock:
            obj = self.b.objects.get(src)
            if obj is None:
                raise FileNotFoundError(src)
            self.b.objects[dst] = _MemoryObject(obj.data, obj.etag, obj.content_type, datetime.now(UTC))

    async def list_page(self, prefix: str, token: str | None) -> tuple[list[ObjectInfo], str | None]:
        self.b._enter("list", prefix)
        with self.b._lock:
            keys = sorted(k for k in self.b.objects if k.startswith(prefix) and (token is None or k > token))
        page = keys[:_LIST_PAGE_SIZE]
        items = [
            ObjectInfo(k, len(o.data), o.etag, o.last_modified)
            for k in page
            if (o := self.b.objects.get(k)) is not None
        ]
        return items, (page[-1] if len(keys) > _LIST_PAGE_SIZE else None)

    async def ensure_bucket(self) -> None:
        return None


class Backend(Protocol):
    def run(self, operation: Callable[[Ops], Any]) -> Any: ...
    def session(self) -> contextlib.AbstractAsyncContextManager[Ops]: ...


# ---- the two faces -------------------------------------------------------------------------------------


def _missing(uri: str) -> FileNotFoundError:
    return FileNotFoundError(f"no object at {uri}")


def _parse_json(uri: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{uri} is not valid JSON: {exc}") from exc


class Storage(Layout):
    """One bucket, the project's key layout, and the few (synchronous) operations the pipeline needs.

    Keys are always relative to the bucket (``raw/abc.pdf``, never ``s3://bucket/raw/abc.pdf``);
    :meth:`uri` gives the full form for messages and asset metadata.
    """

    def __init__(self, bucket: str, backend: Backend, *, config: StorageConfig | None = None) -> None:
        self.bucket = bucket
        self.backend = backend
        #: how to reach the same bucket from another process (rendering workers); None for in-memory storage
        self.config = config
        self._drain_strategy: str | None = None

    @classmethod
    def from_config(cls, cfg: StorageConfig) -> Storage:
        return cls(cfg.bucket, S3Backend(cfg), config=cfg)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bucket={self.bucket!r})"

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncStorage]:
        """An async face of this bucket bound to the running event loop, with its own connection pool."""
        async with self.backend.session() as ops:
            yield AsyncStorage(self.bucket, ops)

    # ---- operations -------------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet (idempotent)."""
        self.backend.run(lambda ops: ops.ensure_bucket())

    def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str | None = None,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        """Write ``data`` under ``key`` in one PUT (atomic, see module doc); returns the new ETag.

        ``if_none_match``: only if no object has the key; ``if_match``: only if its ETag is still this one.
        Either raises :class:`PreconditionFailed` when the condition does not hold.
        """
        _check_key(key)
        return str(self.backend.run(lambda ops: ops.put(key, data, content_type, if_none_match, if_match)))

    def put_json(self, key: str, obj: Any, **conditions: Any) -> str:
        return self.put_bytes(key, json_bytes(obj), "application/json", **conditions)

    def get_bytes(self, key: str, *, if_match: str | None = None) -> bytes:
        """The object's bytes; with ``if_match``, only if its current ETag is still that one (else
        :class:`PreconditionFailed`): the read is of exactly the version that was checked."""
        _check_key(key)
        try:
            return bytes(self.backend.run(lambda ops: ops.get(key, if_match)))
        except FileNotFoundError:
            raise _missing(self.uri(key)) from None

    def get_json(self, key: str) -> Any:
        return _parse_json(self.uri(key), self.get_bytes(key))

    def head(self, key: str) -> ObjectInfo | None:
        """The object's size, ETag and modification time, or ``None`` if there is no such object."""
        _check_key(key)
        return self.backend.run(lambda ops: ops.head(key))  # type: ignore[no-any-return]

    def exists(self, key: str) -> bool:
        """Whether an object exists under exactly this key (a prefix with objects below it does not count)."""
        return self.head(key) is not None

    def delete(self, key: str) -> None:
        """Delete the object under ``key``; deleting a missing key is not an error (S3 semantics)."""
        self.delete_many([key])

    def delete_many(self, keys: list[str]) -> None:
        """Delete these objects, 1000 per request."""
        checked = [_check_key(k) for k in keys]
        if checked:
            self.backend.run(lambda ops: ops.delete(checked))

    def list_versions(self, key: str) -> list[ObjectVersion]:
        """The versions of exactly this key (delete markers left out), newest first, on a versioned bucket."""
        _check_key(key)
        return self.backend.run(lambda ops: ops.list_versions(key))  # type: ignore[no-any-return]

    def drain_strategy(self) -> str:
        """How this bucket lets :meth:`drain` remove a version without touching a newer one (module doc).

        Decided once per Storage: one GetBucketVersioning, and, on an unversioned bucket, a probe of three
        or four requests. An S3 that cannot be asked (outage) raises; the answer is never guessed.
        """
        if self._drain_strategy is None:
            try:
                versioned = bool(self.backend.run(lambda ops: ops.versioned()))
            except OSError as exc:
                if not _answered(exc):
                    raise  # no answer (S3 unreachable): decide later, never guess
                versioned = False  # refused (a credential without s3:GetBucketVersioning): try the next strategy
            if versioned:
                self._drain_strategy = BY_VERSION_ID
            else:
                self._drain_strategy = BY_IF_MATCH if self._delete_if_match_honoured() else KEEP
            if self._drain_strategy == KEEP:
                log.warning(
                    "%s: versioning is off and this S3 ignores If-Match on DeleteObject (as MinIO does): "
                    "ingested objects are left in incoming/ rather than deleted, since a plain DELETE could "
                    "remove a new version uploaded meanwhile. Nothing is lost, but incoming/ grows: enable "
                    "versioning on the bucket (MinIO: `mc version enable ALIAS/%s`; docs/deployment.md).",
                    self.uri(""),
                    self.bucket,
                )
        return self._drain_strategy

    def _delete_if_match_honoured(self) -> bool:
        """Whether DeleteObject refuses a wrong If-Match (412) rather than deleting anyway (MinIO)."""
        import uuid

        probe = f"{PROBE_PREFIX}delete-if-match/{uuid.uuid4().hex}"
        self.put_bytes(probe, b"does this S3 honour If-Match on DeleteObject?")
        try:
            self.backend.run(lambda ops: ops.delete_one(probe, _WRONG_ETAG, None))
        except PreconditionFailed:
            return True
        except OSError as exc:
            if not _answered(exc):
                raise  # no answer (S3 unreachable): decide later, never guess
            log.info("%s: DeleteObject with If-Match is refused (%s): not used", self.uri(""), exc)
            return False
        finally:
            with contextlib.suppress(Exception):
                self.delete(probe)
        return False  # deleted despite the wrong ETag: the header is ignored

    def drain(self, key: str, etag: str | None) -> str:
        """Remove the version of ``key`` whose ETag is ``etag`` (an ingested object), never a newer one.

        Returns :data:`DRAINED` (removed; the key is gone unless a newer version waits), :data:`NEWER_WAITS`
        (a newer version is under the key; left for the sensor), :data:`NOT_FOUND` or :data:`KEPT`
        (strategy ``keep``: nothing removed). Without ``etag`` (a manifest that has none), the version
        current at the time of the call is the one removed.
        """
        _check_key(key)
        strategy = self.drain_strategy()
        if strategy == KEEP:
            return KEPT
        if not etag:
            current = self.head(key)
            if current is None:
                return NOT_FOUND
            etag = current.etag
        if strategy == BY_IF_MATCH:
            try:
                self.backend.run(lambda ops: ops.delete_one(key, etag, None))
            except PreconditionFailed:
                return NEWER_WAITS
            except FileNotFoundError:
                return NOT_FOUND
            return DRAINED
        versions = self.list_versions(key)
        index = next((i for i, v in enumerate(versions) if v.etag == etag), None)
        if index is None:
            return NEWER_WAITS if versions else NOT_FOUND
        # Older versions were superseded by the batched one: removed first (oldest first), so that none of
        # them becomes the current version, and the sensor never sees an old version reappear.
        for version in [*reversed(versions[index + 1 :]), versions[index]]:
            self.backend.run(lambda ops, v=version.version_id: ops.delete_one(key, None, v))
        return DRAINED if index == 0 else NEWER_WAITS

    def copy(self, src: str, dst: str) -> None:
        """Server-side copy within the bucket (the bytes never pass through this process)."""
        _check_key(src), _check_key(dst)
        try:
            self.backend.run(lambda ops: ops.copy(src, dst))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"cannot copy {self.uri(src)} to {self.uri(dst)}: no object at the source"
            ) from None

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order, streamed page by page.

        One ListObjectsV2 pass (1000 keys a request) without a delimiter, so "directories" are not special;
        only one page of results is held at a time, however many objects the prefix holds.
        """
        token: str | None = None
        while True:
            items, token = self.backend.run(lambda ops, t=token: ops.list_page(prefix, t))
            yield from items
            if not token:
                return


class AsyncStorage(Layout):
    """The async face of a bucket (``async with storage.session() as s3``): the same operations, awaited."""

    def __init__(self, bucket: str, ops: Ops) -> None:
        self.bucket = bucket
        self._ops = ops

    async def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str | None = None,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        return await self._ops.put(_check_key(key), data, content_type, if_none_match, if_match)

    async def put_json(self, key: str, obj: Any, **conditions: Any) -> str:
        return await self.put_bytes(key, json_bytes(obj), "application/json", **conditions)

    async def get_bytes(self, key: str, *, if_match: str | None = None) -> bytes:
        try:
            return await self._ops.get(_check_key(key), if_match)
        except FileNotFoundError:
            raise _missing(self.uri(key)) from None

    async def get_json(self, key: str) -> Any:
        return _parse_json(self.uri(key), await self.get_bytes(key))

    async def head(self, key: str) -> ObjectInfo | None:
        return await self._ops.head(_check_key(key))

    async def exists(self, key: str) -> bool:
        return await self.head(key) is not None

    async def delete(self, key: str) -> None:
        await self._ops.delete([_check_key(key)])

    async def list_objects(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        token: str | None = None
        while True:
            items, token = await self._ops.list_page(prefix, token)
            for item in items:
                yield item
            if not token:
                return


class MemoryStorage(Storage):
    """A :class:`Storage` over a dict: the same interface and semantics, for fast in-process tests."""

    def __init__(self, bucket: str = "memory") -> None:
        super().__init__(bucket, MemoryBackend())

    @property
    def memory(self) -> MemoryBackend:
        return self.backend  # type: ignore[return-value]

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.memory.objects if k.startswith(prefix))
