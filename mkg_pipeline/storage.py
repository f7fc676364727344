"""The S3 bucket every artefact lives in: key layout, reads and (atomic) writes, over s3fs.

Layout (DESIGN.md, "Storage layout"), all keys relative to the one bucket:

=========================================  ==========================================================
``incoming/<name>``                        dropped PDFs; the sensor lists this prefix
``raw/<doc_id>.pdf``, ``raw/<doc_id>.json``  accepted PDF (doc_id = sha256[:16] of its bytes), its metadata
``pages/<doc_id>/<n>.png``                 rendered page ``n`` (1-based)
``pages/<doc_id>/manifest.json``           page sizes, image hashes, text layer
``vlm/<doc_id>/pages/<n>.<cache_key>.json``  one page's VLM result
``vlm/<doc_id>/document.md``, ``content.json``, ``status.json``  assembled outputs, per-document status
``rejected/<sanitized name>.json``         why an input was refused (original name inside)
``batches/<batch_id>.json``                ingestion batch manifest
``baseline/<set>/<doc_id>/...``            golden outputs
``quality/<date>/...``                     quality diff reports
=========================================  ==========================================================

Atomicity: every write is one S3 PUT, or for large bodies one multipart upload
(s3fs switches at 100 MiB). S3, MinIO and moto make an object visible only when
the PUT or CompleteMultipartUpload succeeds, and an aborted or killed upload
leaves nothing under the key (an unfinished multipart upload is invisible; a
bucket lifecycle rule should expire those). So a killed writer never leaves a
half object that looks finished, and a reader sees either the old or the new
version of a key. Nothing here appends to or rewrites an object in place.

No Dagster here: the Dagster resource in ``resources.py`` only builds a :class:`Storage`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Final

import s3fs
from aiobotocore.session import AioSession

from mkg_pipeline.config import StorageConfig
from mkg_pipeline.ids import doc_id_for

__all__ = ["ObjectInfo", "Storage", "doc_id_for", "sanitize_source_name"]

#: S3 allows 1024 bytes per key; names are cut well below so prefixes and suffixes always fit
_MAX_NAME_CHARS: Final = 180
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
#: ListObjectsV2 page size (the S3 maximum)
_LIST_PAGE_SIZE: Final = 1000


_session_lock = threading.Lock()
_session: tuple[int, AioSession] | None = None


def _shared_botocore_session() -> AioSession:
    """One aiobotocore session per process, shared by every Storage's own client.

    The session only loads and caches botocore's service models (endpoints, S3 API JSON); sharing it cuts
    the first request of a new Storage from about 300 ms to 80 ms. Clients, connections and credentials
    stay per Storage. Re-created after a fork so a child never inherits its parent's state.
    """
    global _session
    with _session_lock:
        if _session is None or _session[0] != os.getpid():
            _session = (os.getpid(), AioSession())
        return _session[1]


@dataclass(frozen=True)
class ObjectInfo:
    """One object as listed: ``key`` relative to the bucket, ``etag`` without the surrounding quotes."""

    key: str
    size: int
    etag: str
    last_modified: datetime | None


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


class Storage:
    """One bucket, the project's key layout, and the few operations the pipeline needs.

    Keys are always relative to the bucket (``raw/abc.pdf``, never ``s3://bucket/raw/abc.pdf``);
    :meth:`uri` gives the full form for messages and asset metadata.
    """

    incoming_prefix: Final = "incoming/"

    def __init__(self, bucket: str, fs: s3fs.S3FileSystem, *, region: str = "us-east-1") -> None:
        self.bucket = bucket
        self.fs = fs
        self.region = region

    @classmethod
    def from_config(cls, cfg: StorageConfig) -> Storage:
        client_kwargs: dict[str, Any] = {"region_name": cfg.region}
        config_kwargs: dict[str, Any] = {}
        if cfg.endpoint_url:
            client_kwargs["endpoint_url"] = cfg.endpoint_url
            # MinIO and moto serve buckets as paths; virtual-host style would need DNS for <bucket>.<host>.
            config_kwargs["s3"] = {"addressing_style": "path"}
        fs = s3fs.S3FileSystem(
            key=cfg.access_key_id,
            secret=cfg.secret_access_key.get_secret_value() if cfg.secret_access_key else None,
            client_kwargs=client_kwargs,
            config_kwargs=config_kwargs,
            # fsspec caches filesystem instances by constructor arguments and hands the same object to every
            # caller, with its aiobotocore session bound to whichever endpoint/credentials created it. A
            # Storage owns its client instead: no state shared between configs, tests or moto restarts.
            skip_instance_cache=True,
            # Listings must be live: the sensor's whole job is to notice new and replaced objects.
            use_listings_cache=False,
            session=_shared_botocore_session(),
        )
        return cls(cfg.bucket, fs, region=cfg.region)

    def __repr__(self) -> str:
        return f"Storage(bucket={self.bucket!r})"

    # ---- key layout -------------------------------------------------------------------------------------

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

    def vlm_prefix(self, doc_id: str) -> str:
        return f"vlm/{_segment(doc_id, 'doc_id')}/"

    def vlm_page_prefix(self, doc_id: str) -> str:
        return f"{self.vlm_prefix(doc_id)}pages/"

    def vlm_page_key(self, doc_id: str, n: int, cache_key: str) -> str:
        return f"{self.vlm_page_prefix(doc_id)}{_page_number(n)}.{_segment(cache_key, 'cache_key')}.json"

    def document_md_key(self, doc_id: str) -> str:
        return f"{self.vlm_prefix(doc_id)}document.md"

    def content_json_key(self, doc_id: str) -> str:
        return f"{self.vlm_prefix(doc_id)}content.json"

    def vlm_status_key(self, doc_id: str) -> str:
        """Per-document status manifest (pages done/failed, model, timestamps)."""
        return f"{self.vlm_prefix(doc_id)}status.json"

    def rejected_key(self, source_name: str) -> str:
        return f"rejected/{sanitize_source_name(source_name)}.json"

    def batch_key(self, batch_id: str) -> str:
        return f"batches/{_segment(batch_id, 'batch_id')}.json"

    def baseline_key(self, set_name: str, doc_id: str, *parts: str) -> str:
        """``baseline/<set>/<doc_id>/<parts...>``; without parts (or with a trailing '/') it is a prefix."""
        base = f"baseline/{_segment(set_name, 'baseline set')}/{_segment(doc_id, 'doc_id')}/"
        return base + _relative_path(parts, "baseline path")

    def quality_report_key(self, day: date | str, *parts: str) -> str:
        """``quality/<YYYY-MM-DD>/<parts...>``; without parts it is the day's prefix."""
        stamp = day.isoformat()[:10] if isinstance(day, date) else _segment(day, "report date")
        return f"quality/{stamp}/" + _relative_path(parts, "report path")

    # ---- operations -------------------------------------------------------------------------------------

    @staticmethod
    def _key(key: str) -> str:
        if not key or key.startswith(("/", "s3://")):
            raise ValueError(f"keys are relative to the bucket, got {key!r}")
        return key

    def _path(self, key: str) -> str:
        """The s3fs path (``bucket/key``) of a key."""
        return f"{self.bucket}/{self._key(key)}"

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet (idempotent)."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region and self.region != "us-east-1":  # us-east-1 refuses an explicit LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        # s3fs maps BucketAlreadyOwnedByYou/BucketAlreadyExists to FileExistsError. PermissionError: a
        # credential allowed to use but not create the bucket; head_bucket below tells whether it exists.
        with contextlib.suppress(FileExistsError, PermissionError):
            self.fs.call_s3("create_bucket", **kwargs)
        self.fs.call_s3("head_bucket", Bucket=self.bucket)

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Write ``data`` under ``key`` in one PUT (one multipart upload above 100 MiB): atomic, see module doc."""
        extra = {"ContentType": content_type} if content_type else {}
        self.fs.pipe_file(self._path(key), bytes(data), **extra)

    def put_json(self, key: str, obj: Any) -> None:
        body = json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=False).encode("utf-8")
        self.put_bytes(key, body, content_type="application/json")

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            raise FileNotFoundError(f"no object at {self.uri(key)}") from None

    def get_json(self, key: str) -> Any:
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ValueError(f"{self.uri(key)} is not valid JSON: {exc}") from exc

    def head(self, key: str) -> ObjectInfo | None:
        """The object's size, ETag and modification time, or ``None`` if there is no such object."""
        try:
            response = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self._key(key))
        except FileNotFoundError:
            return None
        return ObjectInfo(
            key=key,
            size=int(response.get("ContentLength", 0)),
            etag=str(response.get("ETag", "")).strip('"'),
            last_modified=response.get("LastModified"),
        )

    def exists(self, key: str) -> bool:
        """Whether an object exists under exactly this key (a prefix with objects below it does not count)."""
        return self.head(key) is not None

    def delete(self, key: str) -> None:
        """Delete the object under ``key``; deleting a missing key is not an error (S3 semantics)."""
        self.fs.rm_file(self._path(key))

    def copy(self, src: str, dst: str) -> None:
        """Server-side copy within the bucket (the bytes never pass through this process)."""
        try:
            self.fs.cp_file(self._path(src), self._path(dst))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"cannot copy {self.uri(src)} to {self.uri(dst)}: no object at the source"
            ) from None

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order, streamed page by page.

        One ListObjectsV2 pass (1000 keys a request) without a delimiter, so "directories" are not special;
        only one page of results is held at a time, however many objects the prefix holds.
        """
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": _LIST_PAGE_SIZE}
        while True:
            response = self.fs.call_s3("list_objects_v2", **kwargs)
            for item in response.get("Contents", []):
                yield ObjectInfo(
                    key=item["Key"],
                    size=int(item.get("Size", 0)),
                    etag=str(item.get("ETag", "")).strip('"'),
                    last_modified=item.get("LastModified"),
                )
            token = response.get("NextContinuationToken")
            if not response.get("IsTruncated") or not token:
                return
            kwargs["ContinuationToken"] = token
