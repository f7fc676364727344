"""Command line and settings of the local server, with vLLM's flag names.

The flags that mean something here are vLLM's own (``--host``, ``--port``,
``--api-key`` / ``VLLM_API_KEY``, ``--served-model-name``, ``--max-num-seqs``,
``--max-model-len``, ``--uvicorn-log-level``), so a command line written for
vLLM starts this server unchanged. A few vLLM flags that only concern GPUs
and weights are accepted and ignored (listed in ``IGNORED_VLLM_FLAGS``); any
other unknown flag is an error, so a typo in a fault flag cannot go unnoticed.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "Qwen/Qwen2.5-VL-7B-Instruct"  # the production model: its config works unchanged
DEFAULT_PORT = 8000  # vLLM's default
DEFAULT_MAX_NUM_SEQS = 2  # concurrent OCR jobs; more only queue up on a small CPU
DEFAULT_MAX_MODEL_LEN = 128000  # what vLLM reports for Qwen2.5-VL-7B-Instruct
DEFAULT_HANG_S = 3600.0  # "forever" for any client timeout; still ends if the client disconnects

# vLLM flags that configure GPUs, weights or the engine: accepted for drop-in use, then ignored.
# Value: True if the flag takes a value.
IGNORED_VLLM_FLAGS: dict[str, bool] = {
    "--dtype": True,
    "--gpu-memory-utilization": True,
    "--tensor-parallel-size": True,
    "--max-num-batched-tokens": True,
    "--limit-mm-per-prompt": True,
    "--download-dir": True,
    "--seed": True,
    "--trust-remote-code": False,
    "--enforce-eager": False,
    "--disable-log-requests": False,
    "--disable-log-stats": False,
}


DEFAULT_TRICKLE_INTERVAL_S = 2.0  # one byte every two seconds: slower than any read timeout notices
DEFAULT_HUGE_BYTES = 400_000_000  # the 400 MB answer of the fault campaign

ANSWER_FAULTS = (
    "trickle",
    "huge",
    "truncated",
    "empty",
    "repetition",
    "lone_surrogate",
    "html",
    "content_filter",
    "abort",
    "no_finish",
    "wrong_model",
)
"""Hostile answers, drawn in this order after the model answered (see faults.py)."""


@dataclass
class FaultSettings:
    """Fault injection knobs; all zero means no fault (also changeable at run time).

    Rates are shares of requests (0..1). Transport faults act before the
    model: ``hang``, ``error``, ``malformed``. Hostile answers act after it, on
    a real answer: ``truncated_rate`` (cut, ``finish_reason: "length"``),
    ``empty_rate``, ``repetition_rate`` (a runaway repeated phrase),
    ``trickle_rate`` (a 200 whose body dribbles one byte every
    ``trickle_interval_s`` for ``hang_s``), ``huge_rate`` (an answer of
    ``huge_bytes``, streamed), ``lone_surrogate_rate`` (``"\\ud800"`` in the
    content), ``html_rate`` (fake page markers, unclosed comments and fences,
    a script), the dishonest endings ``content_filter_rate`` (nothing,
    ``finish_reason: "content_filter"``), ``abort_rate`` (half the answer,
    ``"abort"``) and ``no_finish_rate`` (half the answer, ``finish_reason:
    null``), and ``wrong_model_rate`` (the real answer under another model's
    name).
    """

    error_rate: float = 0.0
    latency_s: float = 0.0
    hang_rate: float = 0.0
    malformed_rate: float = 0.0
    down: bool = False
    error_status: int = 500
    hang_s: float = DEFAULT_HANG_S
    trickle_rate: float = 0.0
    trickle_interval_s: float = DEFAULT_TRICKLE_INTERVAL_S
    huge_rate: float = 0.0
    huge_bytes: int = DEFAULT_HUGE_BYTES
    truncated_rate: float = 0.0
    empty_rate: float = 0.0
    repetition_rate: float = 0.0
    lone_surrogate_rate: float = 0.0
    html_rate: float = 0.0
    content_filter_rate: float = 0.0
    abort_rate: float = 0.0
    no_finish_rate: float = 0.0
    wrong_model_rate: float = 0.0

    def to_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)

    def rate(self, fault: str) -> float:
        return float(getattr(self, f"{fault}_rate"))

    def validate(self) -> None:
        for name in ("error_rate", "hang_rate", "malformed_rate", *(f"{fault}_rate" for fault in ANSWER_FAULTS)):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.latency_s < 0 or self.hang_s < 0:
            raise ValueError("latency_s and hang_s must not be negative")
        if self.trickle_interval_s <= 0:
            raise ValueError(f"trickle_interval_s must be positive, got {self.trickle_interval_s}")
        if not 1 <= self.huge_bytes <= 1 << 40:
            raise ValueError(f"huge_bytes must be between 1 and 2**40, got {self.huge_bytes}")
        if not 400 <= self.error_status <= 599:
            raise ValueError(f"error_status must be an HTTP error status (400-599), got {self.error_status}")


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None
    served_model_names: list[str] = field(default_factory=lambda: [DEFAULT_MODEL_NAME])
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    log_level: str = "info"
    fault_injection: bool = False
    faults: FaultSettings = field(default_factory=FaultSettings)
    fault_seed: int | None = None

    @property
    def model_name(self) -> str:
        """The name in metrics labels and answers: the first served name, as in vLLM."""
        return self.served_model_names[0]

    def __repr__(self) -> str:  # never print the key, even in a debug log
        key = "<set>" if self.api_key else None
        return (
            f"ServerSettings(host={self.host!r}, port={self.port}, api_key={key}, "
            f"served_model_names={self.served_model_names!r}, max_num_seqs={self.max_num_seqs}, "
            f"max_model_len={self.max_model_len}, fault_injection={self.fault_injection}, "
            f"faults={self.faults!r}, fault_seed={self.fault_seed})"
        )


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mkg_devstack.local_server",
        description=(
            "OpenAI-compatible local stand-in for vLLM, answering from a CPU OCR model "
            "(RapidOCR PP-OCRv4). Flags are named as vLLM names them."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $VLLM_API_KEY, else no auth)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="vLLM's model path; here only the default served name (no weights are loaded)",
    )
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help=f"model name(s) answered under (default: {DEFAULT_MODEL_NAME})",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=DEFAULT_MAX_NUM_SEQS,
        help=f"concurrent requests processed; more wait in a FIFO queue (default: {DEFAULT_MAX_NUM_SEQS})",
    )
    parser.add_argument(
        "--max-model-len",
        type=_positive_int,
        default=DEFAULT_MAX_MODEL_LEN,
        help=f"context length reported by /v1/models and enforced on max_tokens (default: {DEFAULT_MAX_MODEL_LEN})",
    )
    parser.add_argument(
        "--uvicorn-log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="log level (default: info)",
    )
    faults = parser.add_argument_group("fault injection (tests only; inert without --enable-fault-injection)")
    faults.add_argument(
        "--enable-fault-injection",
        action="store_true",
        help="enable faults and the /fault-injection endpoint",
    )
    faults.add_argument("--fault-error-rate", type=_rate, default=0.0, help="share of requests answered with an error")
    faults.add_argument("--fault-error-status", type=int, default=500, help="HTTP status of injected errors")
    faults.add_argument("--fault-latency-s", type=_non_negative, default=0.0, help="seconds added to every request")
    faults.add_argument("--fault-hang-rate", type=_rate, default=0.0, help="share of requests that hang")
    faults.add_argument(
        "--fault-hang-s", type=_non_negative, default=DEFAULT_HANG_S, help="how long a hang lasts (seconds)"
    )
    faults.add_argument(
        "--fault-malformed-rate", type=_rate, default=0.0, help="share of requests answered 200 with a non-JSON body"
    )
    for fault, what in (
        ("trickle", "answered 200 with a body that dribbles in one byte at a time"),
        ("huge", "answered with a huge body (--fault-huge-bytes), streamed"),
        ("truncated", "whose answer is cut short (finish_reason length)"),
        ("empty", "whose answer is empty"),
        ("repetition", "whose answer ends in a runaway repeated phrase"),
        ("lone-surrogate", "whose answer holds a lone surrogate (\\ud800)"),
        ("html", "whose answer holds fake page markers, unclosed comments/fences and a script"),
        ("content-filter", "answered with nothing and finish_reason content_filter"),
        ("abort", "whose answer stops halfway with finish_reason abort"),
        ("no-finish", "whose answer stops halfway with no finish_reason (null)"),
        ("wrong-model", "answered under another model's name"),
    ):
        faults.add_argument(f"--fault-{fault}-rate", type=_rate, default=0.0, help=f"share of requests {what}")
    faults.add_argument(
        "--fault-trickle-interval-s",
        type=_positive,
        default=DEFAULT_TRICKLE_INTERVAL_S,
        help="seconds between two bytes of a trickling body",
    )
    faults.add_argument(
        "--fault-huge-bytes", type=_positive_int, default=DEFAULT_HUGE_BYTES, help="size of a huge answer in bytes"
    )
    faults.add_argument("--fault-seed", type=int, default=None, help="seed for reproducible random faults")
    return parser


def _strip_ignored(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Remove the ignored vLLM flags (and their values) from argv."""
    kept: list[str] = []
    ignored: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        name = arg.split("=", 1)[0]
        if name in IGNORED_VLLM_FLAGS:
            ignored.append(name)
            if IGNORED_VLLM_FLAGS[name] and "=" not in arg:
                index += 1  # skip the value
        else:
            kept.append(arg)
        index += 1
    return kept, ignored


def parse_args(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> ServerSettings:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ if environ is None else environ)
    argv, ignored = _strip_ignored(argv)
    args = build_parser().parse_args(argv)
    if ignored:
        log.warning("ignoring vLLM flags that mean nothing to the OCR stand-in: %s", ", ".join(sorted(set(ignored))))
    faults = FaultSettings(
        error_rate=args.fault_error_rate,
        latency_s=args.fault_latency_s,
        hang_rate=args.fault_hang_rate,
        malformed_rate=args.fault_malformed_rate,
        error_status=args.fault_error_status,
        hang_s=args.fault_hang_s,
        trickle_interval_s=args.fault_trickle_interval_s,
        huge_bytes=args.fault_huge_bytes,
        **{f"{fault}_rate": getattr(args, f"fault_{fault}_rate") for fault in ANSWER_FAULTS},
    )
    try:
        faults.validate()
    except ValueError as exc:
        build_parser().error(str(exc))
    if not args.enable_fault_injection and faults != FaultSettings():
        log.warning("--fault-* flags are ignored without --enable-fault-injection")
        faults = FaultSettings()
    api_key = args.api_key if args.api_key is not None else (environ.get("VLLM_API_KEY") or None)
    return ServerSettings(
        host=args.host,
        port=args.port,
        api_key=api_key or None,
        # As in vLLM: --served-model-name, else the --model name.
        served_model_names=list(args.served_model_name or [args.model or DEFAULT_MODEL_NAME]),
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        log_level=args.uvicorn_log_level,
        fault_injection=args.enable_fault_injection,
        faults=faults,
        fault_seed=args.fault_seed,
    )
