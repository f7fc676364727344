"""mkg-healthcheck: the image's HEALTHCHECK."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mkg_pipeline import healthcheck

pytestmark = pytest.mark.deploy

HEAVY_MODULES = ("onnxruntime", "rapidocr_onnxruntime", "mineru", "mineru_vl_utils", "torch", "fitz", "pymupdf")


def _status(capsys: pytest.CaptureFixture[str]) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, "exactly one line of JSON"
    return json.loads(lines[0])


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith("MKG_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_config_loads(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck.main([]) == 0
    status = _status(capsys)
    assert status["status"] == "ok" and status["config"] == "ok"
    assert status["server"] == "http://127.0.0.1:8000"


def test_bad_config_names_the_field(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setenv("MKG_HTTP_CLIENT__TIMEOUT_S", "0")
    assert healthcheck.main([]) == healthcheck.EXIT_CONFIG
    status = _status(capsys)
    assert status["status"] == "error"
    assert "http_client.timeout_s" in status["error"]


def test_bad_config_file(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.yaml"
    path.write_text("vllm:\n  max_in_flight: 0\n")
    assert healthcheck.main(["--config", str(path)]) == healthcheck.EXIT_CONFIG
    assert "vllm.max_in_flight" in _status(capsys)["error"]


def test_secret_never_printed(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setenv("MKG_VLLM__API_KEY", "s3cr3t-value")
    clean_env.setenv("MKG_VLLM__URL", "ftp://nowhere")  # invalid: forces an error message
    assert healthcheck.main([]) == healthcheck.EXIT_CONFIG
    assert "s3cr3t-value" not in capsys.readouterr().out


class _Health(BaseHTTPRequestHandler):
    code = 200

    def do_GET(self) -> None:
        self.send_response(self.code if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(params=[200, 503])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    handler = type("Handler", (_Health,), {"code": request.param})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", request.param
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_check_server(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], server) -> None:  # type: ignore[no-untyped-def]
    url, code = server
    clean_env.setenv("MKG_VLLM__URL", url)
    rc = healthcheck.main(["--check-server", "--timeout", "5"])
    status = _status(capsys)
    if code == 200:
        assert rc == 0 and status["server_health"] == "HTTP 200"
    else:
        assert rc == healthcheck.EXIT_SERVER and status["server_health"] == "HTTP 503"


def test_unreachable_server(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    clean_env.setenv("MKG_VLLM__URL", f"http://127.0.0.1:{port}")
    assert healthcheck.main(["--check-server", "--timeout", "2"]) == healthcheck.EXIT_SERVER
    assert _status(capsys)["server_health"].startswith("unreachable")


@pytest.mark.parametrize("extra", [[], ["--import-definitions"]])
def test_imports_no_ocr_onnx_or_mineru(extra: list[str]) -> None:
    """In a fresh interpreter: the check (and the code location import) load no heavy model stack."""
    code = (
        "import sys, json\n"
        "from mkg_pipeline.healthcheck import main\n"
        f"rc = main({extra!r})\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {set(HEAVY_MODULES)!r})\n"
        "sys.stderr.write(json.dumps({'rc': rc, 'heavy': heavy}))\n"
    )
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report["rc"] == 0, result.stdout
    if not extra:
        assert report["heavy"] == []
    else:
        # the code location may import PyMuPDF lazily, never an OCR model, ONNX or MinerU
        assert not [m for m in report["heavy"] if m.split(".")[0] not in {"fitz", "pymupdf"}], report["heavy"]
