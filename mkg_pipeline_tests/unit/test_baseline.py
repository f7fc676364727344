"""Promotion (quality/baseline.py) on MemoryStorage: choosing documents, copying outputs, the golden batch."""

from __future__ import annotations

import pytest

from mkg_pipeline.engines.base import page_cache_key
from mkg_pipeline.quality.baseline import PromotionError, golden_partition, promote_batch, select_documents
from mkg_pipeline.storage import MemoryStorage

IDENTITY = "page_markdown|m|v1"
BATCH = "b20260101T000000-00000001"
A, B = "00000000000000a1", "00000000000000b2"


def _bucket(complete_b: bool = True) -> MemoryStorage:
    s = MemoryStorage()
    s.put_json(
        s.batch_key(BATCH),
        {
            "batch_id": BATCH,
            "objects": [],
            "results": {
                "incoming/a.pdf": {"status": "accepted", "doc_id": A},
                "incoming/b.pdf": {"status": "accepted", "doc_id": B},
                "incoming/x.pdf": {"status": "rejected", "reason": "not_a_pdf", "message": "-"},
            },
        },
    )
    for doc_id, source in ((A, "a.pdf"), (B, "b.pdf")):
        pages = [{"page": n, "png_sha256": f"{doc_id}-{n}"} for n in (1, 2)]
        s.put_json(s.page_manifest_key(doc_id), {"doc_id": doc_id, "source": source, "pages": pages})
        for page in pages:
            if doc_id == B and page["page"] == 2 and not complete_b:
                continue
            key = s.vlm_page_key(doc_id, page["page"], page_cache_key(page["png_sha256"], IDENTITY))
            s.put_json(key, {"markdown": f"{source} page {page['page']}"})
    return s


def test_promote_by_source_copies_pages_and_registers_the_golden_batch() -> None:
    storage = _bucket()
    promotion = promote_batch(storage, BATCH, IDENTITY, sources=["a.pdf"])
    assert promotion.promoted == {A: 2}
    assert promotion.golden_batch == golden_partition("default") == "golden-default"
    assert storage.get_bytes(storage.baseline_key("default", A, "pages/2.md")) == b"a.pdf page 2"
    assert storage.get_json(storage.batch_key("golden-default"))["doc_ids"] == [A]
    # A second promotion adds to the golden set instead of replacing it.
    promote_batch(storage, BATCH, IDENTITY, doc_ids=[B])
    assert storage.get_json(storage.batch_key("golden-default"))["doc_ids"] == [A, B]


def test_an_empty_source_list_promotes_every_accepted_document() -> None:
    assert promote_batch(_bucket(), BATCH, IDENTITY, sources=[]).promoted == {A: 2, B: 2}


def test_an_incomplete_document_is_refused_and_nothing_is_registered() -> None:
    storage = _bucket(complete_b=False)
    with pytest.raises(PromotionError, match="page 2 has no output"):
        promote_batch(storage, BATCH, IDENTITY, doc_ids=[B])
    assert not storage.exists(storage.batch_key("golden-default"))


def test_selection_errors_name_what_the_batch_holds() -> None:
    manifest = _bucket().get_json(_bucket().batch_key(BATCH))
    with pytest.raises(PromotionError, match=r"holds none of \['zzz.pdf'\]; it holds \['a.pdf', 'b.pdf'\]"):
        select_documents(manifest, sources=["zzz.pdf"])
    with pytest.raises(PromotionError, match="holds no accepted document ffff"):
        select_documents(manifest, doc_ids=["ffff"])
    assert select_documents(manifest, sources=["b.pdf", "a.pdf"]) == [B, A]
