"""``python -m mkg_pipeline.audit``: is anything lost? The accounting invariant, checked over the bucket.

The invariant (docs/architecture.md, "The accounting invariant"):

1. every object of every batch manifest ended in ``raw/`` (accepted) or ``rejected/``, or is still
   pending in ``incoming/``. Objects are told apart by key **and ETag**: a new version under the name of a
   batched object is new work, listed as waiting for the sensor (and named once it waits too long), and a
   batched version that left incoming/ without an outcome is lost, whatever else now has its name;
2. every document in ``raw/`` has a page manifest or a recorded render failure, or is pending (never
   rendered yet);
3. every page of a page manifest has a result for the configured engine identity
   (``vlm/<doc_id>/pages/<n>.<cache_key>.json``) that proves itself (it parses and names its document,
   page, cache key and engine: :mod:`mkg_pipeline.records`, the same check the vlm stage makes) or a
   failure in ``status.json`` with its reason and attempts, or is listed in its ``fallback_pages`` (its
   result is the text layer's after invalid VLM answers, ``answers.text_fallback``: counted apart as
   ``pages_fallback``, neither done nor failed), or its document is pending (no ``status.json`` yet);
   every status.json and page manifest proves itself too;
4. no orphans: nothing under ``pages/`` or ``vlm/`` for a document that is not in ``raw/``, and no
   document in ``raw/`` that no batch accepted, unless the object that brought it is still pending in its
   batch (validated, outcome not recorded yet: an ingest in progress, or killed before recording it).

Each problem is a :class:`Finding` that says which object, document or page, what is missing and
what to run. Severities: ``error`` (the invariant is broken: something is lost or inconsistent; exit
status 1), ``warning`` (nothing lost, but a person should look), ``pending`` (work not done yet,
summarised per batch).

Cost: the whole bucket is one LIST per prefix (``incoming/``, ``rejected/``, ``raw/``, ``batches/``,
``pages/``, ``vlm/``) plus one GET per batch manifest, page manifest, render failure and status, and
one GET per page result that its status.json does not vouch for: the stage records the ETag of every
result it counts, so a result whose listed ETag is the recorded one is the object the stage wrote and
checked, and is not read again; any other (written by an older version, or changed behind the
pipeline's back) is read and checked. Memory: batch manifests are checked as they are read and only a compact index is
kept (document -> batch, hashes of settled objects); ``raw/`` is a dict of flags per document;
``pages/`` and ``vlm/`` are streamed and merged with it by document id (listings are in key order), so
one document's keys are held at a time. With ``--batch`` only that batch is audited: one GET of its
manifest, a HEAD per object, and a LIST of ``raw/<doc>.``, ``pages/<doc>/`` and ``vlm/<doc>/`` per
document; the orphan checks need the whole bucket and are skipped.

No Dagster here; the asset check ``bucket_accounting`` (checks.py) runs :func:`audit_bucket` for the
partition's batch.

One job a module: ``report`` (findings, severities, text and JSON), ``batches`` (rule 1 and the batch
index), ``listing`` (the documents' keys, streamed), ``documents`` (rules 2-4 for one document), ``bucket``
(the order of the checks over the bucket or one batch), ``cli`` (``main``).
"""

from mkg_pipeline.audit.batches import UNBATCHED_AFTER_S
from mkg_pipeline.audit.bucket import audit_bucket
from mkg_pipeline.audit.cli import main
from mkg_pipeline.audit.report import ERROR, PENDING, WARNING, AuditReport, Finding

__all__ = ["ERROR", "PENDING", "UNBATCHED_AFTER_S", "WARNING", "AuditReport", "Finding", "audit_bucket", "main"]
