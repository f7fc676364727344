"""Storage.drain and conditional reads against moto (server mode), through a proxy that can act mid-request.

Issue 21, row 1: removing an ingested object from incoming/ must never remove a newer version that lands
between the check and the DELETE. The proxy's ``intercept`` lands that version just before the DELETE
is forwarded. Each drain strategy is exercised on the S3 that selects it: a versioned bucket
(``version_id``), an unversioned bucket of an S3 that honours If-Match on DeleteObject (moto, AWS:
``if_match``), and one that ignores it (MinIO; here the proxy renames the header, so moto never sees
it: ``keep``).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mkg_pipeline.config import StorageConfig
from mkg_pipeline.storage import (
    BY_IF_MATCH,
    BY_VERSION_ID,
    DRAINED,
    KEEP,
    KEPT,
    NEWER_WAITS,
    NOT_FOUND,
    PreconditionFailed,
    Storage,
)
from mkg_pipeline_tests.fixtures.proxy import TcpProxy

pytestmark = pytest.mark.integration

KEY = "incoming/report.pdf"


@pytest.fixture
def via_proxy(storage: Storage, storage_config: StorageConfig, tcp_proxy: Callable[[str], TcpProxy]):  # type: ignore[no-untyped-def]
    """(a Storage that reaches the test's bucket through a proxy, the proxy)."""
    proxy = tcp_proxy(str(storage_config.endpoint_url))
    return Storage.from_config(storage_config.model_copy(update={"endpoint_url": proxy.url})), proxy


def _land_before_delete(proxy: TcpProxy, direct: Storage, data: bytes) -> list[str]:
    landed: list[str] = []

    def intercept(chunk: bytes) -> None:
        if not landed and chunk.startswith(b"DELETE ") and KEY.encode() in chunk.split(b"\r\n", 1)[0]:
            landed.append(direct.put_bytes(KEY, data))

    proxy.intercept = intercept
    return landed


def _version(storage: Storage) -> None:
    storage.backend.fs.make_bucket_versioned(storage.bucket)


def _forget_versions(storage: Storage) -> None:
    """Teardown of a versioned bucket: s3fs removes every version (and delete marker), then the bucket."""
    storage.backend.fs.rm(storage.bucket, recursive=True)


def test_an_unversioned_bucket_that_honours_if_match_drains_with_it(storage: Storage, via_proxy) -> None:  # type: ignore[no-untyped-def]
    s3, proxy = via_proxy
    etag = storage.put_bytes(KEY, b"old")
    assert s3.drain_strategy() == BY_IF_MATCH
    assert [o.key for o in storage.list_objects("probes/")] == []  # the probe cleans up after itself
    landed = _land_before_delete(proxy, storage, b"new")
    assert s3.drain(KEY, etag) == NEWER_WAITS
    assert landed and storage.get_bytes(KEY) == b"new"
    proxy.intercept = None
    assert s3.drain(KEY, landed[0]) == DRAINED
    assert not storage.exists(KEY)
    assert s3.drain(KEY, landed[0]) == NOT_FOUND


def test_a_versioned_bucket_drains_by_version_id(storage: Storage, via_proxy) -> None:  # type: ignore[no-untyped-def]
    s3, proxy = via_proxy
    _version(storage)
    try:
        storage.put_bytes(KEY, b"superseded before it was batched")
        etag = storage.put_bytes(KEY, b"batched")
        assert s3.drain_strategy() == BY_VERSION_ID
        landed = _land_before_delete(proxy, storage, b"new")
        assert s3.drain(KEY, etag) == DRAINED
        # The new version landed before the first DELETE: it is current, alone, untouched; the batched
        # version and the superseded one are gone (the superseded one never became current again).
        assert landed and storage.get_bytes(KEY) == b"new"
        assert [v.etag for v in storage.list_versions(KEY)] == landed
        proxy.intercept = None
        assert s3.drain(KEY, etag) == NEWER_WAITS  # the batched version is gone; the new one waits
        assert s3.drain(KEY, landed[0]) == DRAINED
        assert not storage.exists(KEY) and storage.list_versions(KEY) == []
    finally:
        _forget_versions(storage)


def test_an_s3_that_ignores_if_match_on_delete_keeps_objects(storage: Storage, via_proxy) -> None:  # type: ignore[no-untyped-def]
    s3, proxy = via_proxy

    def strip_if_match(chunk: bytes) -> bytes | None:
        # MinIO reads no If-Match on DELETE: rename the header (same length, so nothing else changes).
        return chunk.replace(b"If-Match:", b"X-Ignore:") if chunk.startswith(b"DELETE ") else None

    proxy.intercept = strip_if_match
    etag = storage.put_bytes(KEY, b"old")
    assert s3.drain_strategy() == KEEP
    assert [o.key for o in storage.list_objects("probes/")] == []
    assert s3.drain(KEY, etag) == KEPT
    assert storage.get_bytes(KEY) == b"old"


def test_a_conditional_read_sees_only_the_version_it_names(storage: Storage) -> None:
    etag = storage.put_bytes(KEY, b"old")
    assert storage.get_bytes(KEY, if_match=etag) == b"old"
    storage.put_bytes(KEY, b"new")
    with pytest.raises(PreconditionFailed):
        storage.get_bytes(KEY, if_match=etag)
    storage.delete(KEY)
    with pytest.raises(FileNotFoundError):
        storage.get_bytes(KEY, if_match=etag)
