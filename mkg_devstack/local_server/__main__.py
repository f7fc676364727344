"""``python -m mkg_devstack.local_server``: run the local OCR stand-in for vLLM."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from mkg_devstack.local_server.settings import parse_args

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = parse_args(argv)
    logging.getLogger().setLevel(settings.log_level.upper() if settings.log_level != "trace" else "DEBUG")

    import uvicorn

    from mkg_devstack.local_server.app import create_app

    log = logging.getLogger("mkg_devstack.local_server")
    log.warning(
        "LOCAL OCR STAND-IN, NOT A VLM: answering vLLM's OpenAI API as %s on http://%s:%d "
        "from RapidOCR (CPU); max_num_seqs=%d, api key %s, fault injection %s",
        ", ".join(settings.served_model_names),
        settings.host,
        settings.port,
        settings.max_num_seqs,
        "required" if settings.api_key else "not required",
        "ENABLED" if settings.fault_injection else "off",
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep our logging setup; uvicorn's loggers propagate to it
        log_level=settings.log_level,
        access_log=False,  # the gate middleware logs each request once, without headers
        timeout_graceful_shutdown=2,  # injected hangs must not hold up a stop
    )
    server = uvicorn.Server(config)
    state = app.state.server

    def stop_on_fatal() -> None:
        server.should_exit = True

    state.on_fatal = stop_on_fatal
    server.run()
    if state.load_error:
        log.error("exiting: the OCR model could not be loaded (%s)", state.load_error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
