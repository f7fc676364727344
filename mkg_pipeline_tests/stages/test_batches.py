"""Batch manifests that are not what they claim: every shape of corruption gets one clear message."""

from __future__ import annotations

import json

import pytest

from mkg_pipeline.stages.batches import (
    BatchManifestInvalid,
    accepted_doc_ids,
    read_batch_manifest,
    write_batch_manifest,
)
from mkg_pipeline.storage import MemoryStorage

CORRUPT = {
    "a list": [],
    "an empty object": {},
    "null": None,
    "a number": 42,
    "a string": "batch",
    "objects not a list": {"batch_id": "b", "objects": {"key": "incoming/a.pdf"}, "results": {}},
    "objects of non-objects": {"batch_id": "b", "objects": ["incoming/a.pdf", 3], "results": {}},
    "an object without a key": {"batch_id": "b", "objects": [{"etag": "e", "size": 1}], "results": {}},
    "a key that is a number": {"batch_id": "b", "objects": [{"key": 7, "etag": "e", "size": 1}], "results": {}},
    "a size that is a string": {"batch_id": "b", "objects": [{"key": "k", "etag": "e", "size": "1"}], "results": {}},
    "results a list": {"batch_id": "b", "objects": [], "results": []},
    "a result not an object": {"batch_id": "b", "objects": [], "results": {"incoming/a.pdf": "accepted"}},
    "an accepted result without doc_id": {
        "batch_id": "b",
        "objects": [],
        "results": {"incoming/a.pdf": {"status": "accepted"}},
    },
    "doc_ids of numbers": {"batch_id": "b", "objects": [], "results": {}, "doc_ids": [1, 2]},
    "doc_ids a string": {"batch_id": "b", "objects": [], "results": {}, "doc_ids": "abc"},
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_a_corrupt_manifest_is_named_clearly(case: str) -> None:
    storage = MemoryStorage()
    storage.put_bytes(storage.batch_key("b-bad"), json.dumps(CORRUPT[case]).encode())
    with pytest.raises(BatchManifestInvalid) as caught:
        accepted_doc_ids(read_batch_manifest(storage, "b-bad"))
    message = str(caught.value)
    # The same family of message as garbage bytes get ("... is not valid JSON"): the object, what is wrong.
    assert storage.uri(storage.batch_key("b-bad")) in message
    assert "is not a valid batch manifest" in message
    assert isinstance(caught.value, ValueError)  # callers that catch ValueError (not valid JSON) still do


def test_garbage_bytes_keep_their_message() -> None:
    storage = MemoryStorage()
    storage.put_bytes(storage.batch_key("b-bad"), b"\x00garbage")
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_batch_manifest(storage, "b-bad")


def test_a_written_manifest_reads_back() -> None:
    storage = MemoryStorage()
    write_batch_manifest(storage, "b-ok", [], origin="test")
    assert read_batch_manifest(storage, "b-ok")["objects"] == []
    # a golden batch lists documents directly
    golden = {"batch_id": "golden", "objects": [], "results": {}, "doc_ids": ["a"]}
    storage.put_json(storage.batch_key("golden"), golden)
    assert accepted_doc_ids(read_batch_manifest(storage, "golden")) == ["a"]
