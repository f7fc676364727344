"""raw_pdfs against real S3 (moto): keys are used literally, whatever characters they hold (issue 9, row 9)."""

from __future__ import annotations

import pytest

from mkg_pipeline.config import PDFConfig
from mkg_pipeline.ids import doc_id_for
from mkg_pipeline.stages.batches import IncomingObject, write_batch_manifest
from mkg_pipeline.stages.ingest import ingest_batch
from mkg_pipeline.storage import Storage
from mkg_pipeline_tests.fixtures.corpus import corpus_pdf

pytestmark = pytest.mark.integration


def test_a_key_that_looks_like_a_version_query_is_its_own_object(storage: Storage) -> None:
    plain = corpus_pdf("minimal-document.pdf").read_bytes()
    odd = corpus_pdf("two-pages.pdf").read_bytes()
    storage.put_bytes("incoming/report2.pdf", plain)
    storage.put_bytes("incoming/report2.pdf?versionId=x", odd)
    head = storage.head("incoming/report2.pdf?versionId=x")
    assert head is not None
    write_batch_manifest(storage, "b-literal", [IncomingObject(head.key, head.etag, head.size)], origin="test")

    summary = ingest_batch(storage, "b-literal", PDFConfig())

    assert summary.accepted == {"incoming/report2.pdf?versionId=x": doc_id_for(odd)}
    assert storage.get_bytes(storage.raw_key(doc_id_for(odd))) == odd
    assert not storage.exists(storage.raw_key(doc_id_for(plain)))
    # The object of the batch is drained; its neighbour, never batched, is untouched.
    assert not storage.exists("incoming/report2.pdf?versionId=x")
    assert storage.get_bytes("incoming/report2.pdf") == plain
