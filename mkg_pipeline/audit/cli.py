"""``python -m mkg_pipeline.audit [--batch ID] [--json]``: the audit as the person on call runs it."""

from __future__ import annotations

import argparse
import json
import sys

from mkg_pipeline.audit.bucket import audit_bucket
from mkg_pipeline.storage import Storage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mkg_pipeline.audit",
        description="Check that nothing is lost: every object, document and page of the bucket is accounted for. "
        "Exit status 1 when the accounting invariant is broken (see docs/runbook.md, 'Audit').",
    )
    parser.add_argument("--batch", metavar="ID", help="audit one batch (partition) only")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--max-per-kind", type=int, default=20, help="findings printed per kind (text output)")
    args = parser.parse_args(argv)

    from mkg_pipeline.config import get_settings
    from mkg_pipeline.engines.base import engine_identity

    settings = get_settings()
    storage = Storage.from_config(settings.storage)
    identity = engine_identity(settings.engine, settings.vllm.model, settings.prompt_version)
    report = audit_bucket(storage, identity, batch_id=args.batch)
    sys.stdout.write(
        (json.dumps(report.to_json(), indent=1) if args.json else report.to_text(args.max_per_kind)) + "\n"
    )
    return 0 if report.ok else 1
