"""The audit's report: its findings, their severities, the text and JSON it prints, and what to run."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

ERROR, WARNING, PENDING = "error", "warning", "pending"


@dataclass(frozen=True)
class Finding:
    kind: str
    severity: str
    subject: str  # the object, document or page concerned (an S3 URI where there is one)
    message: str  # what is wrong
    action: str  # what to do about it
    batch_id: str | None = None
    doc_id: str | None = None
    page: int | None = None


@dataclass
class AuditReport:
    bucket: str
    identity: str
    scope: str
    findings: list[Finding] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    #: (batch_id, what) -> number of objects/documents/pages pending
    pending: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)

    def of(self, severity: str) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    @property
    def ok(self) -> bool:
        """The invariant holds (pending work and warnings allowed)."""
        return not self.of(ERROR)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "bucket": self.bucket,
            "identity": self.identity,
            "scope": self.scope,
            "counts": dict(self.counts),
            "pending": [{"batch_id": b, "what": w, "count": n} for (b, w), n in sorted(self.pending.items())],
            "findings": [asdict(f) for f in self.findings],
        }

    def to_text(self, max_per_kind: int = 20) -> str:
        c = self.counts
        lines = [
            f"audit of s3://{self.bucket} ({self.scope}), engine identity {self.identity}",
            f"checked: {c['batches']} batch(es), {c['objects']} batched object(s), {c['documents']} document(s), "
            f"{c['pages']} page(s): {c['pages_done']} done, {c['pages_failed']} failed (recorded)"
            + (
                f", {c['pages_fallback']} served from the text layer (fallback, asked again next run)"
                if c["pages_fallback"]
                else ""
            ),
        ]
        for severity in (ERROR, WARNING):
            found = self.of(severity)
            if not found:
                continue
            lines += ["", f"{severity.upper()}S ({len(found)}):"]
            for kind, group in itertools.groupby(sorted(found, key=lambda f: f.kind), key=lambda f: f.kind):
                items = list(group)
                for f in items[:max_per_kind]:
                    lines.append(f"- [{kind}] {f.subject}" + (f" (batch {f.batch_id})" if f.batch_id else ""))
                    lines.append(f"    {f.message}")
                    lines.append(f"    -> {f.action}")
                if len(items) > max_per_kind:
                    lines.append(f"- [{kind}] ... and {len(items) - max_per_kind} more (--json lists all)")
        if self.pending:
            lines += ["", "PENDING (work not done yet, nothing lost):"]
            for (batch, what), n in sorted(self.pending.items()):
                lines.append(f"- batch {batch}: {n} {what}")
        verdict = "OK: nothing lost" if self.ok else "BROKEN: the accounting invariant does not hold"
        lines += [
            "",
            f"{verdict} ({len(self.of(ERROR))} error(s), {len(self.of(WARNING))} warning(s), "
            f"{sum(self.pending.values())} pending item(s))",
        ]
        return "\n".join(lines)


# ---- pending work: what to run for it ----------------------------------------------------------------------

_PENDING_WHAT = {
    "ingest": "object(s) still in incoming/, not ingested yet -> materialize raw_pdfs for the batch",
    "render": "document(s) not rendered yet -> materialize parsed_pages for the batch",
    "vlm": "document(s) not sent to the VLM yet (no status.json) -> materialize vlm_outputs for the batch",
    "stale": "document(s) whose vlm step was interrupted (status stale) -> materialize vlm_outputs for the batch",
    "engine": "document(s) processed with another engine identity only -> materialize vlm_outputs for the batch",
}


def _materialize(asset: str, batch_id: str | None, doc_id: str | None = None, extra: str = "") -> str:
    if not batch_id:
        return f"find the batch that holds document {doc_id} and materialize {asset} for it"
    command = f"dagster asset materialize -m mkg_pipeline --select {asset} --partition {batch_id}"
    if doc_id:
        config = {"ops": {asset: {"config": {"doc_ids": [doc_id], **({"force": True} if extra == "force" else {})}}}}
        command += f" --config-json '{json.dumps(config)}'"
    return f"run `{command}` (or materialize {asset} for partition {batch_id} in the UI)"
