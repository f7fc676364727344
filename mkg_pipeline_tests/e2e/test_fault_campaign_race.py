"""Fault campaign (issue 21, row 1): a new version of an incoming object races raw_pdfs.

The pipeline reaches moto through the campaign's TCP proxy; its ``intercept`` sees each request on its
way and, at the worst moment, puts a new version of the object into moto directly (the test's own
client, not through the proxy) before the request is forwarded:

- just before the drain's DELETE of the ingested object: the old code deleted the new version
  unprocessed, and the audit said "OK: nothing lost";
- just before ingest reads the object it has checked: the old code recorded the new bytes as the
  batched version.

After each case: the new version is waiting in incoming/ (the audit lists it as waiting for the sensor),
the next sensor tick batches it, the re-run processes it, nothing is lost and the audit is clean.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mkg_pipeline_tests.e2e.campaign import Campaign, doc_id_of, report_row, tiny_pdf

pytestmark = pytest.mark.e2e

WAITING = ("(none yet)", "object(s) in incoming/ not batched yet -> the sensor batches them")


def _request_line(chunk: bytes) -> bytes:
    return chunk.split(b"\r\n", 1)[0]


def _land_before(campaign: Campaign, key: str, data: bytes, is_target: Callable[[bytes], bool]) -> list[str]:
    """The first request chunk for which ``is_target`` holds lands ``data`` under ``key`` before it is
    forwarded; returns the ETags landed (one, once it happened)."""
    landed: list[str] = []

    def intercept(chunk: bytes) -> None:
        if not landed and is_target(chunk):
            landed.append(campaign.storage.put_bytes(key, data))

    campaign.proxy.intercept = intercept
    return landed


def _the_new_version_is_processed_next(campaign: Campaign, key: str, etag: str, new: bytes, fault: str, shown: str):  # type: ignore[no-untyped-def]
    """The new version waits in incoming/, is listed by the audit, batched by the next tick, and processed."""
    assert campaign.keys("incoming/") == [key], campaign.keys("incoming/")
    assert campaign.storage.head(key).etag == etag  # the new version, untouched
    report = campaign.audit(pending=True)
    assert report.pending.get(WAITING) == 1, report.to_text()

    later = campaign.pipeline.tick().run_requests or []
    assert len(later) == 1, later
    rerun = campaign.rerun_and_account(str(later[0].partition_key), {doc_id_of(new): 2})
    assert not campaign.keys("incoming/")
    report_row(fault, rerun, shown)
    return rerun


@pytest.mark.parametrize("bucket", ["unversioned", "versioned"])
def test_a_replacement_racing_the_drain(campaign: Campaign, bucket: str) -> None:
    """Unversioned: the drain deletes with If-Match (moto honours it, as AWS does). Versioned (MinIO's way,
    deploy/): the drain deletes the batched version by its version id."""
    if bucket == "versioned":
        campaign.storage.backend.fs.make_bucket_versioned(campaign.storage.bucket)
    key, old, new = "incoming/race-drain.pdf", tiny_pdf("race drain, old", 1), tiny_pdf("race drain, new", 2)
    batch = campaign.new_batch({"race-drain.pdf": old})

    def is_drain(chunk: bytes) -> bool:
        # DeleteObject (DELETE /bucket/incoming/...) or DeleteObjects (POST ?delete, the key in the XML body)
        deletes = _request_line(chunk).startswith(b"DELETE ") or b"<Delete" in chunk
        return deletes and key.encode() in chunk

    landed = _land_before(campaign, key, new, is_drain)
    result = campaign.materialize(batch)
    campaign.proxy.intercept = None
    view = campaign.view(result.run_id)
    assert result.success, view.describe()
    assert landed, "the drain never sent a DELETE for the object"
    assert campaign.accepted(batch) == [doc_id_of(old)]
    _the_new_version_is_processed_next(
        campaign, key, landed[0], new, f"a new version lands just before the drain's DELETE ({bucket})", view.describe()
    )
    assert campaign.storage.exists(campaign.storage.raw_key(doc_id_of(old)))
    if bucket == "versioned":  # drained by version id: no version of the name is left behind
        assert campaign.storage.list_versions(key) == []


def test_a_replacement_between_check_and_read_at_ingest(campaign: Campaign) -> None:
    key, old, new = "incoming/race-read.pdf", tiny_pdf("race read, old", 1), tiny_pdf("race read, new", 2)
    batch = campaign.new_batch({"race-read.pdf": old})

    def is_read(chunk: bytes) -> bool:
        line = _request_line(chunk)
        return line.startswith(b"GET ") and b"/" + key.encode() in line

    landed = _land_before(campaign, key, new, is_read)
    result = campaign.materialize(batch, "raw_pdfs")
    campaign.proxy.intercept = None
    view = campaign.view(result.run_id)
    assert result.success, view.describe()
    assert landed, "ingest never read the object"
    # The batched version was overwritten before it could be read: it is not recorded as the new bytes.
    manifest = campaign.storage.get_json(campaign.storage.batch_key(batch))
    outcome = manifest["results"][key]
    assert outcome["status"] == "superseded" and "replaced since it was batched" in outcome["message"], outcome
    assert not campaign.keys("raw/")
    _the_new_version_is_processed_next(
        campaign, key, landed[0], new, "a new version lands between ingest's check and its read", view.describe()
    )
