"""Storage against a real S3 endpoint (moto in server mode), plus the key layout of DESIGN.md."""

from __future__ import annotations

import re
from datetime import date

import pytest

from mkg_pipeline.config import StorageConfig
from mkg_pipeline.storage import ObjectInfo, Storage, doc_id_for, sanitize_source_name

pytestmark = pytest.mark.integration

DOC = "0123456789abcdef"


def test_bytes_round_trip_with_content_type(storage: Storage) -> None:
    payload = bytes(range(256)) * 10
    storage.put_bytes("raw/x.pdf", payload, content_type="application/pdf")
    assert storage.get_bytes("raw/x.pdf") == payload
    head = storage.fs.call_s3("head_object", Bucket=storage.bucket, Key="raw/x.pdf")
    assert head["ContentType"] == "application/pdf"


def test_json_round_trip(storage: Storage) -> None:
    document = {"source": "Prüfbericht 2024.pdf", "pages": [1, 2, 3], "nested": {"ok": True, "none": None}}
    storage.put_json("batches/b1.json", document)
    assert storage.get_json("batches/b1.json") == document
    head = storage.fs.call_s3("head_object", Bucket=storage.bucket, Key="batches/b1.json")
    assert head["ContentType"] == "application/json"


def test_exists_and_delete(storage: Storage) -> None:
    assert not storage.exists("a/b.txt")
    storage.put_bytes("a/b.txt", b"x")
    assert storage.exists("a/b.txt")
    assert not storage.exists("a/")  # a prefix with objects below it is not an object
    assert not storage.exists("a")
    storage.delete("a/b.txt")
    assert not storage.exists("a/b.txt")
    storage.delete("a/b.txt")  # deleting twice is fine, as in S3


def test_missing_key_error_names_the_uri(storage: Storage) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        storage.get_bytes("vlm/nothing/document.md")
    assert f"s3://{storage.bucket}/vlm/nothing/document.md" in str(caught.value)
    with pytest.raises(FileNotFoundError, match=re.escape(f"s3://{storage.bucket}/missing.json")):
        storage.get_json("missing.json")
    assert storage.head("missing.json") is None


def test_list_objects_paginates_past_1000(storage: Storage) -> None:
    # 1100 tiny objects in a few concurrent batches (s3fs pipe) to keep the test quick.
    paths = {f"{storage.bucket}/incoming/{i:05d}.pdf": b"%PDF" for i in range(1100)}
    storage.fs.pipe(paths)
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


def test_list_objects_keys_are_relative_and_etags_match_head(storage: Storage) -> None:
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


def test_copy(storage: Storage) -> None:
    storage.put_bytes("incoming/a.pdf", b"%PDF-1.4 content", content_type="application/pdf")
    storage.copy("incoming/a.pdf", "raw/a.pdf")
    assert storage.get_bytes("raw/a.pdf") == b"%PDF-1.4 content"
    assert storage.exists("incoming/a.pdf")
    with pytest.raises(FileNotFoundError, match=re.escape(f"s3://{storage.bucket}/incoming/none.pdf")):
        storage.copy("incoming/none.pdf", "raw/none.pdf")


def test_etag_changes_when_an_object_is_replaced(storage: Storage) -> None:
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


def test_buckets_are_isolated_and_ensure_bucket_is_idempotent(storage: Storage, storage_config: StorageConfig) -> None:
    storage.ensure_bucket()
    storage.put_bytes("k", b"v")
    other = Storage.from_config(storage_config.model_copy(update={"bucket": storage_config.bucket + "-other"}))
    other.ensure_bucket()
    assert not other.exists("k")
    assert list(other.list_objects("")) == []
    other.fs.call_s3("delete_bucket", Bucket=other.bucket)


def test_each_storage_has_its_own_filesystem(storage_config: StorageConfig) -> None:
    # fsspec would hand back one cached instance for equal arguments; a Storage must own its client.
    first = Storage.from_config(storage_config)
    second = Storage.from_config(storage_config)
    elsewhere = Storage.from_config(storage_config.model_copy(update={"endpoint_url": "http://127.0.0.1:9"}))
    assert first.fs is not second.fs
    assert elsewhere.fs is not first.fs
    assert elsewhere.fs.client_kwargs["endpoint_url"] == "http://127.0.0.1:9"
    assert first.fs.client_kwargs["endpoint_url"] == storage_config.endpoint_url


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
    assert s.content_json_key(DOC) == f"vlm/{DOC}/content.json"
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
