"""Storage against a real S3 endpoint (moto in server mode), plus the key layout of docs/architecture.md."""

from __future__ import annotations

import asyncio
import re
from datetime import date

import pytest

from mkg_pipeline.config import StorageConfig
from mkg_pipeline.storage import (
    MemoryStorage,
    ObjectInfo,
    PreconditionFailed,
    Storage,
    doc_id_for,
    sanitize_source_name,
)

pytestmark = pytest.mark.integration

DOC = "0123456789abcdef"


@pytest.fixture(params=["moto", "memory"])
def any_storage(request: pytest.FixtureRequest) -> Storage:
    """The same behaviour is required of the S3 backend (moto server) and of the in-memory one."""
    if request.param == "memory":
        return MemoryStorage()
    return request.getfixturevalue("storage")


def test_bytes_round_trip_with_content_type(any_storage: Storage) -> None:
    payload = bytes(range(256)) * 10
    any_storage.put_bytes("raw/x.pdf", payload, content_type="application/pdf")
    assert any_storage.get_bytes("raw/x.pdf") == payload
    head = any_storage.head("raw/x.pdf")
    assert head is not None and head.content_type == "application/pdf"


def test_json_round_trip(any_storage: Storage) -> None:
    document = {"source": "Prüfbericht 2024.pdf", "pages": [1, 2, 3], "nested": {"ok": True, "none": None}}
    any_storage.put_json("batches/b1.json", document)
    assert any_storage.get_json("batches/b1.json") == document
    head = any_storage.head("batches/b1.json")
    assert head is not None and head.content_type == "application/json"


def test_exists_and_delete(any_storage: Storage) -> None:
    storage = any_storage
    assert not storage.exists("a/b.txt")
    storage.put_bytes("a/b.txt", b"x")
    assert storage.exists("a/b.txt")
    assert not storage.exists("a/")  # a prefix with objects below it is not an object
    assert not storage.exists("a")
    storage.delete("a/b.txt")
    assert not storage.exists("a/b.txt")
    storage.delete("a/b.txt")  # deleting twice is fine, as in S3


def test_keys_are_literal(any_storage: Storage) -> None:
    # s3fs's path methods would read "report2.pdf?versionId=x" as a version of "report2.pdf".
    storage = any_storage
    storage.put_bytes("incoming/report2.pdf", b"plain")
    storage.put_bytes("incoming/report2.pdf?versionId=x", b"question mark")
    storage.put_bytes("incoming/a b#c%20.pdf", b"odd")
    assert storage.get_bytes("incoming/report2.pdf?versionId=x") == b"question mark"
    assert storage.get_bytes("incoming/report2.pdf") == b"plain"
    assert storage.get_bytes("incoming/a b#c%20.pdf") == b"odd"
    storage.delete("incoming/report2.pdf?versionId=x")
    assert storage.get_bytes("incoming/report2.pdf") == b"plain"
    assert [o.key for o in storage.list_objects("incoming/")] == ["incoming/a b#c%20.pdf", "incoming/report2.pdf"]


def test_conditional_writes(any_storage: Storage) -> None:
    storage = any_storage
    first = storage.put_bytes("leases/b1.json", b"mine", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        storage.put_bytes("leases/b1.json", b"theirs", if_none_match=True)
    second = storage.put_bytes("leases/b1.json", b"renewed", if_match=first)
    assert second != first
    with pytest.raises(PreconditionFailed):
        storage.put_bytes("leases/b1.json", b"stale writer", if_match=first)
    with pytest.raises(PreconditionFailed):
        storage.put_bytes("leases/none.json", b"x", if_match=first)
    assert storage.get_bytes("leases/b1.json") == b"renewed"
    head = storage.head("leases/b1.json")
    assert head is not None and head.etag == second


def test_missing_key_error_names_the_uri(any_storage: Storage) -> None:
    storage = any_storage
    with pytest.raises(FileNotFoundError) as caught:
        storage.get_bytes("vlm/nothing/document.md")
    assert f"s3://{storage.bucket}/vlm/nothing/document.md" in str(caught.value)
    with pytest.raises(FileNotFoundError, match=re.escape(f"s3://{storage.bucket}/missing.json")):
        storage.get_json("missing.json")
    assert storage.head("missing.json") is None


async def _put_many(storage: Storage, items: dict[str, bytes]) -> None:
    async with storage.session() as s3:
        await asyncio.gather(*(s3.put_bytes(key, data) for key, data in items.items()))


def test_list_objects_paginates_past_1000(any_storage: Storage) -> None:
    storage = any_storage
    asyncio.run(_put_many(storage, {f"incoming/{i:05d}.pdf": b"%PDF" for i in range(1100)}))
    storage.put_bytes("incomingX/not-under-the-prefix.pdf", b"x")
    storage.put_bytes("raw/other.pdf", b"x")
    listing = storage.list_objects(storage.incoming_prefix)
    first = next(listing)  # a generator: the first page is usable before the rest is fetched
    rest = list(listing)
    keys = [first.key, *(o.key for o in rest)]
    # S3 returns at most 1000 keys per ListObjectsV2 call: 1100 proves the continuation token was followed.
    assert len(keys) == 1100
    assert keys == sorted(keys) and len(set(keys)) == 1100
    assert keys[0] == "incoming/00000.pdf" and keys[-1] == "incoming/01099.pdf"
    assert all(o.size == 4 and o.etag and o.last_modified is not None for o in rest)
    everything = {o.key for o in storage.list_objects("")}
    assert len(everything) == 1102
    storage.delete_many(keys)
    assert [o.key for o in storage.list_objects("")] == ["incomingX/not-under-the-prefix.pdf", "raw/other.pdf"]


def test_async_session_has_the_same_operations(any_storage: Storage) -> None:
    async def scenario() -> None:
        async with any_storage.session() as s3:
            await s3.put_json("vlm/d/status.json", {"state": "stale"})
            assert await s3.get_json("vlm/d/status.json") == {"state": "stale"}
            await s3.put_bytes("vlm/d/pages/1.k.json", b"{}")
            assert [o.key async for o in s3.list_objects("vlm/d/pages/")] == ["vlm/d/pages/1.k.json"]
            assert await s3.exists("vlm/d/pages/1.k.json")
            with pytest.raises(PreconditionFailed):
                await s3.put_bytes("vlm/d/pages/1.k.json", b"again", if_none_match=True)
            with pytest.raises(FileNotFoundError, match=re.escape(s3.uri("vlm/d/none.json"))):
                await s3.get_bytes("vlm/d/none.json")
            await s3.delete("vlm/d/pages/1.k.json")
            assert await s3.head("vlm/d/pages/1.k.json") is None

    asyncio.run(scenario())
    assert any_storage.get_json("vlm/d/status.json") == {"state": "stale"}


def test_list_objects_keys_are_relative_and_etags_match_head(any_storage: Storage) -> None:
    storage = any_storage
    storage.put_bytes("pages/d/1.png", b"png-1")
    storage.put_bytes("pages/d/manifest.json", b"{}")
    listed = list(storage.list_objects("pages/d/"))
    assert [o.key for o in listed] == ["pages/d/1.png", "pages/d/manifest.json"]
    assert all(isinstance(o, ObjectInfo) for o in listed)
    head = storage.head("pages/d/1.png")
    assert head is not None
    assert head.etag == listed[0].etag and not head.etag.startswith('"')
    assert head.size == listed[0].size == 5
    assert list(storage.list_objects("nothing/here/")) == []


def test_copy(any_storage: Storage) -> None:
    storage = any_storage
    storage.put_bytes("incoming/a.pdf", b"%PDF-1.4 content", content_type="application/pdf")
    storage.copy("incoming/a.pdf", "raw/a.pdf")
    assert storage.get_bytes("raw/a.pdf") == b"%PDF-1.4 content"
    assert storage.exists("incoming/a.pdf")
    with pytest.raises(FileNotFoundError, match=re.escape(f"s3://{storage.bucket}/incoming/none.pdf")):
        storage.copy("incoming/none.pdf", "raw/none.pdf")


def test_etag_changes_when_an_object_is_replaced(any_storage: Storage) -> None:
    storage = any_storage
    key = "incoming/report.pdf"
    storage.put_bytes(key, b"first version")
    before = storage.head(key)
    storage.put_bytes(key, b"second version")
    after = storage.head(key)
    assert before is not None and after is not None
    assert before.etag != after.etag  # the sensor's signal that the same name is new work
    assert storage.get_bytes(key) == b"second version"
    (listed,) = storage.list_objects("incoming/")
    assert listed.etag == after.etag


def test_memory_backend_can_fail_any_operation() -> None:
    storage = MemoryStorage()

    def fail_puts(op: str, key: str) -> None:
        if op == "put" and key.startswith("raw/"):
            raise ConnectionError(f"S3 is down ({key})")

    storage.memory.fault = fail_puts
    storage.put_bytes("batches/b.json", b"{}")
    with pytest.raises(ConnectionError, match="S3 is down"):
        storage.put_bytes("raw/x.pdf", b"%PDF")
    assert storage.keys() == ["batches/b.json"]
    assert storage.memory.calls["put"] == 2


def test_buckets_are_isolated_and_ensure_bucket_is_idempotent(storage: Storage, storage_config: StorageConfig) -> None:
    storage.ensure_bucket()
    storage.put_bytes("k", b"v")
    other = Storage.from_config(storage_config.model_copy(update={"bucket": storage_config.bucket + "-other"}))
    other.ensure_bucket()
    assert not other.exists("k")
    assert list(other.list_objects("")) == []
    other.backend.fs.rmdir(other.bucket)


def test_each_storage_has_its_own_filesystem(storage_config: StorageConfig) -> None:
    # fsspec would hand back one cached instance for equal arguments; a Storage must own its client.
    first = Storage.from_config(storage_config)
    second = Storage.from_config(storage_config)
    elsewhere = Storage.from_config(storage_config.model_copy(update={"endpoint_url": "http://127.0.0.1:9"}))
    assert first.backend.fs is not second.backend.fs
    assert elsewhere.backend.fs is not first.backend.fs
    assert elsewhere.backend.fs.client_kwargs["endpoint_url"] == "http://127.0.0.1:9"
    assert first.backend.fs.client_kwargs["endpoint_url"] == storage_config.endpoint_url


def test_keys_match_the_design_layout() -> None:
    s = Storage.from_config(StorageConfig(bucket="mkg-bucket"))  # no request is made to build keys
    assert s.incoming_prefix == "incoming/"
    assert s.uri("raw/x.pdf") == "s3://mkg-bucket/raw/x.pdf"
    assert s.raw_key(DOC) == f"raw/{DOC}.pdf"
    assert s.raw_meta_key(DOC) == f"raw/{DOC}.json"
    assert s.page_png_key(DOC, 3) == f"pages/{DOC}/3.png"
    assert s.page_manifest_key(DOC) == f"pages/{DOC}/manifest.json"
    assert s.vlm_page_key(DOC, 3, "c0ffee") == f"vlm/{DOC}/pages/3.c0ffee.json"
    assert s.vlm_page_key(DOC, 3, "c0ffee").startswith(s.vlm_page_prefix(DOC))
    assert s.vlm_page_prefix(DOC) == f"vlm/{DOC}/pages/"
    assert s.document_md_key(DOC) == f"vlm/{DOC}/document.md"
    assert s.content_list_key(DOC) == f"vlm/{DOC}/content_list.json"
    assert s.vlm_image_key(DOC, "images/ab12.jpg") == s.vlm_image_key(DOC, "ab12.jpg") == f"vlm/{DOC}/images/ab12.jpg"
    assert s.render_failure_key(DOC) == f"pages/{DOC}/failure.json"
    assert s.lease_key("b1") == "leases/b1.json"
    assert s.vlm_status_key(DOC) == f"vlm/{DOC}/status.json"
    assert s.rejected_key("bad-not-a-pdf.pdf") == "rejected/bad-not-a-pdf.pdf.json"
    assert s.batch_key("b20250101T000000-abcd1234") == "batches/b20250101T000000-abcd1234.json"
    assert s.baseline_key("default", DOC) == f"baseline/default/{DOC}/"
    assert s.baseline_key("default", DOC, "pages/") == f"baseline/default/{DOC}/pages/"
    assert s.baseline_key("default", DOC, "pages/1.md") == f"baseline/default/{DOC}/pages/1.md"
    assert s.baseline_key("default", DOC, "meta.json") == f"baseline/default/{DOC}/meta.json"
    assert s.quality_report_key(date(2025, 3, 9), "b1.json") == "quality/2025-03-09/b1.json"
    assert s.quality_report_key("2025-03-09") == "quality/2025-03-09/"


def test_keys_refuse_inputs_that_would_escape_the_layout() -> None:
    s = Storage.from_config(StorageConfig(bucket="mkg-bucket"))
    for bad in ["", "a/b", "..", "."]:
        with pytest.raises(ValueError):
            s.raw_key(bad)
    with pytest.raises(ValueError):
        s.page_png_key(DOC, 0)
    with pytest.raises(ValueError):
        s.vlm_page_key(DOC, 1, "x/y")
    with pytest.raises(ValueError):
        s.baseline_key("default", DOC, "../../raw/x.pdf")
    with pytest.raises(ValueError):
        s.get_bytes("s3://mkg-bucket/raw/x.pdf")  # keys are relative to the bucket


def test_sanitize_source_name() -> None:
    assert sanitize_source_name("report-2024_v1.pdf") == "report-2024_v1.pdf"
    spaced = sanitize_source_name("a b.pdf")
    assert spaced.startswith("a_b.pdf-") and spaced != sanitize_source_name("a_b.pdf")
    for name in ["../../etc/passwd", "dir/sub/x.pdf", ".hidden.pdf", "Prüfbericht.pdf", "", "x" * 600]:
        safe = sanitize_source_name(name)
        assert safe and "/" not in safe and not safe.startswith(".") and len(safe) <= 180
        assert sanitize_source_name(name) == safe  # stable


def test_doc_id_for_is_reexported() -> None:
    assert doc_id_for(b"abc") == "ba7816bf8f01cfea"


def test_s3_going_down_and_coming_back_through_a_proxy(storage_config: StorageConfig, tcp_proxy) -> None:
    proxy = tcp_proxy(str(storage_config.endpoint_url))
    through = Storage.from_config(storage_config.model_copy(update={"endpoint_url": proxy.url}))
    through.ensure_bucket()
    through.put_bytes("k", b"before")
    proxy.down()
    with pytest.raises(Exception) as caught:
        through.get_bytes("k")
    assert not isinstance(caught.value, FileNotFoundError)  # "down" must never read as "missing"
    proxy.up()
    assert through.get_bytes("k") == b"before"
    through.delete("k")
    through.backend.fs.rmdir(through.bucket)
