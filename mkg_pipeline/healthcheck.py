"""Container health check: ``mkg-healthcheck``.

Exit 0 when the configuration loads (``config/mineru.yaml`` or ``MKG_CONFIG_FILE``
plus ``MKG_*`` environment variables) and, with ``--check-server``, when the VLM
server's ``GET /health`` answers 200. ``--import-definitions`` also imports the
Dagster code location (``mkg_pipeline.orchestration.definitions``), which catches a broken image
before Dagster does.

It prints one line of JSON on stdout, for ``docker inspect`` and pod events::

    {"status": "ok", "config": "ok", "engine": "page_markdown", "server": "http://vllm:8000", ...}

The check must stay cheap and importable in any image: it loads the
configuration module (pydantic) and the standard library only. It never
imports an OCR model, an ONNX runtime or MinerU, and never prints a secret
(configuration errors never echo secret values, see :mod:`mkg_pipeline.config`).
``/health`` needs no API key on vLLM (only ``/v1/*`` is protected), so none is sent.

Exit codes: 0 healthy, 1 configuration invalid, 2 server unhealthy or unreachable,
3 code location failed to import.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from mkg_pipeline.config import ConfigError, load_config

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_SERVER = 2
EXIT_DEFINITIONS = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mkg-healthcheck",
        description="Exit 0 if the configuration loads (and, if asked, the VLM server is healthy).",
    )
    parser.add_argument("--config", default=None, help="YAML file (default: MKG_CONFIG_FILE or config/mineru.yaml).")
    parser.add_argument("--check-server", action="store_true", help="Also require GET <vllm.url>/health to answer 200.")
    parser.add_argument(
        "--import-definitions",
        action="store_true",
        help="Also import mkg_pipeline.orchestration.definitions (the code location).",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="Seconds to wait for /health (default: vllm.connection_timeout_s from the configuration).",
    )
    return parser


def probe_server(base_url: str, timeout_s: float) -> tuple[bool, str]:
    """GET ``<base_url>/health``: (True, "200") on HTTP 200, else (False, reason)."""
    try:
        # base_url is http(s) only: VLLMServerConfig validates the scheme.
        with urllib.request.urlopen(f"{base_url}/health", timeout=timeout_s) as response:
            code = response.status
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"unreachable: {type(reason).__name__}: {reason}"
    return code == 200, f"HTTP {code}"


def _emit(status: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(status, sort_keys=True) + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    status: dict[str, Any] = {"status": "ok"}

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        status.update(status="error", config="invalid", error=str(exc))
        _emit(status)
        return EXIT_CONFIG
    status.update(config="ok", engine=config.engine, model=config.vllm.model, server=config.vllm.url)

    code = EXIT_OK
    if args.check_server:
        timeout = args.timeout if args.timeout is not None else config.vllm.connection_timeout_s
        healthy, detail = probe_server(config.vllm.url, timeout)
        status["server_health"] = detail
        if not healthy:
            status["status"] = "error"
            code = EXIT_SERVER

    if args.import_definitions and code == EXIT_OK:
        try:
            importlib.import_module("mkg_pipeline.orchestration.definitions")
        except Exception as exc:  # any import-time failure makes the image unusable as a code location
            status.update(status="error", definitions="failed", error=f"{type(exc).__name__}: {exc}")
            code = EXIT_DEFINITIONS
        else:
            status["definitions"] = "ok"

    status["elapsed_s"] = round(time.perf_counter() - started, 3)
    _emit(status)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
