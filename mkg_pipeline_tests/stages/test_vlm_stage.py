"""The vlm stage in-process: MemoryStorage, a scripted engine and a scripted limiter; no network, no Dagster."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from mkg_pipeline.engines.base import AnswerRejected, PageInput, PageResult, engine_identity
from mkg_pipeline.stages.vlm import (
    ClaimLost,
    DocumentsNotProcessed,
    StorageUnavailable,
    VLMSummary,
    process_documents,
)
from mkg_pipeline.storage import MemoryStorage
from mkg_pipeline.vllm.errors import CircuitOpenError, VLLMConnectionError
from mkg_pipeline_tests.stages.conftest import fail_once, record_ops

IDENTITY = engine_identity("scripted", "test-model", "v1")

Behaviour = Callable[[PageInput], Awaitable[PageResult]]


@dataclass
class ScriptedGate:
    """The limiter as the stage sees it: a fixed limit; the engine counts its requests in flight."""

    limit: int = 4
    in_flight: int = 0
    waiting: int = 0
    peak: int = 0
    freed: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.in_flight -= 1
        self.freed.set()

    async def wait_for_capacity(self) -> None:
        while self.in_flight + self.waiting >= self.limit:
            self.freed.clear()
            await self.freed.wait()


@dataclass
class ScriptedEngine:
    gate: ScriptedGate
    name: str = "scripted"
    identity: str = IDENTITY
    behaviours: dict[str, Behaviour] = field(default_factory=dict)  # label -> behaviour
    calls: list[str] = field(default_factory=list)

    async def extract(self, page: PageInput) -> PageResult:
        self.calls.append(page.label)
        self.gate.in_flight += 1
        self.gate.peak = max(self.gate.peak, self.gate.in_flight)
        try:
            behaviour = self.behaviours.get(page.label)
            if behaviour is not None:
                return await behaviour(page)
            await asyncio.sleep(0)
            return answer(f"text of {page.label}", page.page_idx)
        finally:
            self.gate.release()


def answer(text: str, page_idx: int = 0) -> PageResult:
    return PageResult(
        markdown=text,
        content_list=[{"type": "text", "text": text, "page_idx": page_idx}],
        images={},
        requests=1,
        raw_answer=text,
        finish_reason="stop",
    )


def seed_document(storage: MemoryStorage, doc_id: str, pages: int, source: str | None = None) -> None:
    entries = []
    for n in range(1, pages + 1):
        png = f"png {doc_id} {n}".encode()
        key = storage.page_png_key(doc_id, n)
        storage.put_bytes(key, png, "image/png")
        entries.append(
            {"page": n, "png_key": key, "png_sha256": hashlib.sha256(png).hexdigest(), "text_layer_chars": 100}
        )
    storage.put_json(
        storage.page_manifest_key(doc_id),
        {"doc_id": doc_id, "source": source or f"{doc_id}.pdf", "pages": entries, "failed_pages": []},
    )


def run(storage: MemoryStorage, engine: ScriptedEngine, doc_ids: list[str], **kwargs: Any) -> VLMSummary:
    return asyncio.run(
        process_documents(
            storage, engine, doc_ids, engine.gate, server_url="http://vlm", model="test-model", run_id="r1", **kwargs
        )
    )


def label(doc_id: str, page: int) -> str:
    return f"doc={doc_id} page={page}"


@pytest.fixture
def storage() -> MemoryStorage:
    return MemoryStorage()


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine(ScriptedGate())


def test_first_run_processes_every_page_and_records_the_document(
    storage: MemoryStorage, engine: ScriptedEngine
) -> None:
    seed_document(storage, "doca", 3)
    summary = run(storage, engine, ["doca"])
    assert sorted(engine.calls) == [label("doca", n) for n in (1, 2, 3)]
    assert (summary.processed, summary.cached, summary.failed, summary.pages_total) == (3, 0, 0, 3)
    assert summary.documents == {"doca": "complete"}
    assert len(storage.keys(storage.vlm_page_prefix("doca"))) == 3
    status = storage.get_json(storage.vlm_status_key("doca"))
    assert (status["state"], status["pages_done"], status["failed_pages"]) == ("complete", 3, [])
    assert status["run_id"] == "r1"
    markdown = storage.get_bytes(storage.document_md_key("doca")).decode()
    assert markdown.index("page=1") < markdown.index("page=2") < markdown.index("page=3")
    assert [item["page_idx"] for item in storage.get_json(storage.content_list_key("doca"))] == [0, 1, 2]


def test_second_run_is_all_cache_hits_and_rewrites_nothing(storage: MemoryStorage, engine: ScriptedEngine) -> None:
    seed_document(storage, "doca", 3)
    run(storage, engine, ["doca"])
    engine.calls.clear()
    puts = storage.memory.calls["put"]
    summary = run(storage, engine, ["doca"])
    assert engine.calls == []
    assert (summary.processed, summary.cached) == (0, 3)
    assert summary.documents == {"doca": "complete"}
    assert storage.memory.calls["put"] == puts  # a complete, current document is left as it is


def test_failed_pages_are_recorded_with_attempts_and_retried_alone(
    storage: MemoryStorage, engine: ScriptedEngine
) -> None:
    seed_document(storage, "doca", 3)

    async def refused(page: PageInput) -> PageResult:
        raise VLLMConnectionError("connection refused", server="http://vlm", label=page.label)

    engine.behaviours[label("doca", 2)] = refused
    first = run(storage, engine, ["doca"])
    assert (first.processed, first.failed, dict(first.failure_reasons)) == (2, 1, {"connect": 1})
    status = storage.get_json(storage.vlm_status_key("doca"))
    assert status["state"] == "partial"
    (failure,) = status["failed_pages"]
    assert (failure["page"], failure["reason"], failure["attempts"]) == (2, "connect", 1)
    assert "connection refused" in failure["message"]
    assert (
        "Page 2 is not in this document yet** (`connect`)"
        in storage.get_bytes(storage.document_md_key("doca")).decode()
    )

    engine.calls.clear()
    run(storage, engine, ["doca"])  # still failing: one more attempt counted
    assert engine.calls == [label("doca", 2)]
    assert storage.get_json(storage.vlm_status_key("doca"))["failed_pages"][0]["attempts"] == 2

    del engine.behaviours[label("doca", 2)]
    engine.calls.clear()
    run(storage, engine, ["doca"])
    assert engine.calls == [label("doca", 2)]
    status = storage.get_json(storage.vlm_status_key("doca"))
    assert (status["state"], status["pages_done"], status["failed_pages"]) == ("complete", 3, [])


def test_rejected_answers_are_failures_with_their_reason_and_cost(
    storage: MemoryStorage, engine: ScriptedEngine
) -> None:
    seed_document(storage, "doca", 2)

    async def truncated(page: PageInput) -> PageResult:
        raise AnswerRejected("truncated", 2, "finish_reason=length twice")

    engine.behaviours[label("doca", 1)] = truncated
    summary = run(storage, engine, ["doca"])
    assert dict(summary.failure_reasons) == {"truncated": 1}
    assert summary.requests == 3  # the rejected page's two requests are counted, not hidden
    assert storage.keys(storage.vlm_page_prefix("doca")) == [k for k in storage.keys("vlm/") if "/pages/2." in k]


def test_breaker_failures_record_the_first_real_cause(storage: MemoryStorage, engine: ScriptedEngine) -> None:
    seed_document(storage, "doca", 1)

    async def breaker_open(page: PageInput) -> PageResult:
        error = CircuitOpenError("circuit open", server="http://vlm", label=page.label)
        error.first_cause = "timeout"  # type: ignore[attr-defined]
        raise error

    engine.behaviours[label("doca", 1)] = breaker_open
    run(storage, engine, ["doca"])
    (failure,) = storage.get_json(storage.vlm_status_key("doca"))["failed_pages"]
    assert failure["reason"] == "timeout"
    assert "circuit_open" in failure["message"]


def test_one_unstorable_answer_fails_its_page_only(storage: MemoryStorage, engine: ScriptedEngine) -> None:
    seed_document(storage, "doca", 3)

    async def lone_surrogate(page: PageInput) -> PageResult:
        return answer("bad \ud800 text")

    engine.behaviours[label("doca", 2)] = lone_surrogate
    summary = run(storage, engine, ["doca"])
    assert (summary.processed, summary.failed) == (2, 1)
    (failure,) = storage.get_json(storage.vlm_status_key("doca"))["failed_pages"]
    assert failure["reason"] == "storage_error" and "UnicodeEncodeError" in failure["message"]


def test_a_failing_page_put_fails_that_page_and_the_rerun_retries_it(
    storage: MemoryStorage, engine: ScriptedEngine
) -> None:
    seed_document(storage, "doca", 3)
    broken = storage.vlm_page_prefix("doca") + "2."

    def fail_page_two(op: str, key: str) -> None:
        if op == "put" and key.startswith(broken):
            raise ConnectionError("S3 refused the PUT")

    storage.memory.fault = fail_page_two
    first = run(storage, engine, ["doca"])
    assert (first.processed, first.failed, dict(first.failure_reasons)) == (2, 1, {"storage_error": 1})
    storage.memory.fault = None
    engine.calls.clear()
    run(storage, engine, ["doca"])
    assert engine.calls == [label("doca", 2)]
    assert storage.get_json(storage.vlm_status_key("doca"))["state"] == "complete"


def test_crash_between_page_put_and_status_put_resumes_without_requests(
    storage: MemoryStorage, engine: ScriptedEngine
) -> None:
    seed_document(storage, "doca", 3)

    def status_unwritable(op: str, key: str) -> None:
        if op == "put" and key == storage.vlm_status_key("doca"):
            raise ConnectionError("S3 went away")

    storage.memory.fault = status_unwritable
    with pytest.raises(StorageUnavailable, match="re-materialize vlm_outputs to resume"):
        run(storage, engine, ["doca"])
    assert len(storage.keys(storage.vlm_page_prefix("doca"))) == 3  # every answer was kept
    assert not storage.exists(storage.vlm_status_key("doca"))

    storage.memory.fault = None
    engine.calls.clear()
    summary = run(storage, engine, ["doca"])
    assert engine.calls == []
    assert summary.cached == 3
    assert storage.get_json(storage.vlm_status_key("doca"))["state"] == "complete"


def test_a_step_that_dies_leaves_the_old_status_marked_stale(storage: MemoryStorage, engine: ScriptedEngine) -> None:
    seed_document(storage, "doca", 2)
    run(storage, engine, ["doca"])
    assert storage.get_json(storage.vlm_status_key("doca"))["state"] == "complete"

    def outputs_unwritable(op: str, key: str) -> None:
        if op == "put" and key.endswith(("document.md", "content_list.json")):
            raise ConnectionError("S3 went away")

    storage.memory.fault = outputs_unwritable
    with pytest.raises(StorageUnavailable):
        run(storage, engine, ["doca"], force_refresh=True)
    status = storage.get_json(storage.vlm_status_key("doca"))
    assert (status["state"], status["run_id"]) == ("stale", "r1")


def test_force_refresh_asks_again(storage: MemoryStorage, engine: ScriptedEngine) -> None:
    seed_document(storage, "doca", 2)
    run(storage, engine, ["doca"])
    engine.calls.clear()
    summary = run(storage, engine, ["doca"], force_refresh=True)
    assert sorted(engine.calls) == [label("doca", 1), label("doca", 2)]
    assert (summary.processed, summary.cached) == (2, 0)


def test_unrendered_documents_are_reported_and_do_not_stop_the_others(
    storage: MemoryStorage, engine: ScriptedEngine
) -> None:
    seed_document(storage, "doca", 1)
    summary = run(storage, engine, ["nomanifest", "doca"])
    assert summary.unrendered == ["nomanifest"]
    assert summary.documents == {"doca": "complete"}


def test_documents_are_assembled_as_soon_as_their_last_page_finishes(
    storage: MemoryStorage, engine: ScriptedEngine
) -> None:
    seed_document(storage, "doca", 1)
    seed_document(storage, "docb", 2)
    saw_doca_done = asyncio.Event()

    async def wait_for_doca(page: PageInput) -> PageResult:
        # docb's last page holds until doca's outputs exist: only a streaming stage gets past this.
        for _ in range(1000):
            if storage.exists(storage.vlm_status_key("doca")):
                saw_doca_done.set()
                break
            await asyncio.sleep(0.001)
        return answer("late page")

    engine.behaviours[label("docb", 2)] = wait_for_doca
    summary = run(storage, engine, ["docb", "doca"])
    assert saw_doca_done.is_set()
    assert summary.documents == {"doca": "complete", "docb": "complete"}


def test_pages_in_flight_follow_the_limiter(storage: MemoryStorage) -> None:
    gate = ScriptedGate(limit=8)
    engine = ScriptedEngine(gate)

    async def slow(page: PageInput) -> PageResult:
        await asyncio.sleep(0.01)
        return answer("x")

    for n in range(1, 61):
        engine.behaviours[label("doca", n)] = slow
    seed_document(storage, "doca", 60)
    summary = run(storage, engine, ["doca"])
    assert summary.processed == 60
    # The stage fills the limiter's room and never more than it plus the image prefetch (here 2).
    assert gate.limit <= gate.peak <= gate.limit + 2


def test_the_next_document_is_opened_while_this_ones_pages_are_in_flight(storage: MemoryStorage) -> None:
    """Opening a document (its manifest, status and listing) is off the path between one document's last
    page and the next one's first (issue 18: the stage kept up with the client path only without S3)."""
    gate = ScriptedGate(limit=1)
    engine = ScriptedEngine(gate)
    seed_document(storage, "doca", 5)
    seed_document(storage, "docb", 1)
    docb_opened = asyncio.Event()
    manifest_b = storage.page_manifest_key("docb")
    storage.memory.fault = lambda op, key: docb_opened.set() if (op, key) == ("get", manifest_b) else None

    async def held(page: PageInput) -> PageResult:
        # doca's pages fill the limiter's room and its prefetch; they end only once docb is opened
        try:
            await asyncio.wait_for(docb_opened.wait(), 10)  # a guard against a hang, not a timing assertion
        except TimeoutError:
            raise RuntimeError("docb was not opened while doca's pages were in flight") from None
        return answer("x", page.page_idx)

    for n in range(1, 6):
        engine.behaviours[label("doca", n)] = held
    summary = run(storage, engine, ["doca", "docb"])
    assert summary.failure_rows == []
    assert (summary.processed, summary.documents) == (6, {"doca": "complete", "docb": "complete"})


def test_a_freed_slot_finds_the_next_page_waiting_while_answered_pages_are_stored(storage: MemoryStorage) -> None:
    """The scheduler is woken when a page leaves the engine, not once its record is stored (issue 18). With the
    real limiter (limit 1) the pages beyond it wait for its slot, and a freed slot goes to the first of them:
    the limiter itself wakes the scheduler only once that queue is empty, which leaves the slot idle while
    the next page's image is fetched. Page records are held until every page has been asked, as a slow
    store would."""
    import contextlib

    from mkg_pipeline.vllm.limiter import AdaptiveLimiter

    limiter = AdaptiveLimiter("http://one-slot", min_limit=1, max_limit=1, adaptive=False)
    queued_behind: list[int] = []  # pages waiting for the slot when each page took it
    all_asked = asyncio.Event()

    class OneSlotEngine:
        name = "scripted"
        identity = IDENTITY

        async def extract(self, page: PageInput) -> PageResult:
            with await limiter.acquire():
                # A request takes a while: 50 turns of the event loop (not time) give the scheduler every
                # chance to start the pages it has room for (two beyond the limit), and to settle.
                for _ in range(50):
                    await asyncio.sleep(0)
                queued_behind.append(limiter.waiting)
                if len(queued_behind) == 6:
                    all_asked.set()
                return answer(f"text of {page.label}", page.page_idx)

    class HeldRecords:
        def __init__(self, ops: Any) -> None:
            self.ops = ops

        def __getattr__(self, name: str) -> Any:
            return getattr(self.ops, name)

        async def put(self, key: str, *args: Any) -> str:
            if key.startswith("vlm/doca/pages/"):
                await all_asked.wait()
            return await self.ops.put(key, *args)

    plain_session = storage.memory.session

    @contextlib.asynccontextmanager
    async def session() -> Any:
        async with plain_session() as ops:
            yield HeldRecords(ops)

    storage.memory.session = session  # type: ignore[method-assign]
    seed_document(storage, "doca", 6)
    summary = asyncio.run(
        process_documents(
            storage, OneSlotEngine(), ["doca"], limiter, server_url="http://vlm", model="test-model", run_id="r1"
        )
    )
    assert summary.processed == 6
    # Each page found the two the scheduler has room for beyond the limit waiting for the slot, to the end.
    assert queued_behind == [2, 2, 2, 2, 1, 0]


def test_the_prefetch_covers_the_image_fetch_at_the_rate_slots_free() -> None:
    from mkg_pipeline.stages.vlm import prefetch_margin

    assert prefetch_margin(32, None, None) == 4  # nothing measured yet: an eighth of the limit
    assert prefetch_margin(8, 0.001, 0.5) == 2  # a fast store: at least two
    # 32 slots answered in 0.5 s free 64 a second; a 50 ms fetch needs 3.2 pages under way, twice that ahead
    assert prefetch_margin(32, 0.05, 0.5) == 7
    assert prefetch_margin(32, 2.0, 0.5) == 32  # never more than the limit again


def test_a_limit_raised_by_the_limiter_starts_pages_while_none_ends(storage: MemoryStorage) -> None:
    """A reading that raises the limit wakes the stage at once (issue 18): with every page in flight held
    until the test lets go, the only event that can start more pages is the limiter's."""
    gate = ScriptedGate(limit=2)
    engine = ScriptedEngine(gate)
    release = asyncio.Event()
    started: list[int] = []

    async def held(page: PageInput) -> PageResult:
        started.append(page.page_idx)
        if len(started) == 2 and gate.limit == 2:  # the first two are in: the limiter now reads room for 6
            gate.limit = 6
            gate.freed.set()
        if len(started) == 6:
            release.set()  # every page the raised limit allows is in flight, and none has ended yet
        await release.wait()
        return answer("x", page.page_idx)

    for n in range(1, 7):
        engine.behaviours[label("doca", n)] = held
    seed_document(storage, "doca", 6)
    summary = run(storage, engine, ["doca"])
    assert summary.processed == 6
    assert gate.peak == 6


def test_s3_down_for_the_whole_step_fails_once_and_the_next_run_resumes(
    storage: MemoryStorage, engine: ScriptedEngine
) -> None:
    for doc_id in ("doca", "docb"):
        seed_document(storage, doc_id, 40)

    def s3_down(op: str, key: str) -> None:
        raise ConnectionError("Connection refused")

    storage.memory.fault = s3_down
    with pytest.raises(StorageUnavailable, match=r"is S3 reachable.*Connection refused"):
        run(storage, engine, ["doca", "docb"])
    assert engine.calls == []
    # It gave up after a handful of failed calls instead of failing all 80 pages one by one.
    assert storage.memory.calls["get"] < 20

    storage.memory.fault = None
    summary = run(storage, engine, ["doca", "docb"])
    assert summary.processed == 80
    assert summary.documents == {"doca": "complete", "docb": "complete"}


def test_a_run_that_lost_its_batch_starts_nothing_more(storage: MemoryStorage, engine: ScriptedEngine) -> None:
    """Once the claim check raises (another run took the batch over), no page, document or assembly starts;
    the pages already done are stored, and the step ends with ClaimLost."""
    seed_document(storage, "doca", 6)
    seed_document(storage, "docb", 2)
    engine.gate.limit = 1
    checks = {"n": 0}

    def claim() -> None:
        checks["n"] += 1
        if len(engine.calls) >= 2:
            raise RuntimeError("batch b1: run r1 no longer holds the lease: another run took it over after it expired")

    with pytest.raises(ClaimLost, match="no longer holds the lease"):
        run(storage, engine, ["doca", "docb"], claim=claim)
    assert checks["n"] > 0
    assert len(engine.calls) <= 2 + 2  # what was started before (the limit and the look-ahead), nothing after
    assert not any("docb" in call for call in engine.calls)
    assert len(storage.keys(storage.vlm_page_prefix("doca"))) == len(engine.calls)  # what was asked is kept
    assert not storage.exists(storage.vlm_status_key("doca"))  # left to the run that took the batch over


# ---- records that prove themselves (issue 21 rows 4, 5) --------------------------------------------------------


def page_key(storage: MemoryStorage, doc_id: str, n: int) -> str:
    (key,) = [k for k in storage.keys(storage.vlm_page_prefix(doc_id)) if k.split("/")[-1].startswith(f"{n}.")]
    return key


def truncate(storage: MemoryStorage, key: str) -> None:
    data = storage.get_bytes(key)
    storage.put_bytes(key, data[: len(data) // 2], "application/json")


def test_a_truncated_page_result_is_redone_when_its_document_is_reassembled(
    storage: MemoryStorage, engine: ScriptedEngine
) -> None:
    """Row 4: page 3 failed, page 2's stored result was cut in half; the re-run must redo page 2 (not count it
    as done) and must not blame S3 for it."""
    seed_document(storage, "doca", 3)

    async def refused(page: PageInput) -> PageResult:
        raise VLLMConnectionError("connection refused", server="http://vlm", label=page.label)

    engine.behaviours[label("doca", 3)] = refused
    run(storage, engine, ["doca"])
    truncate(storage, page_key(storage, "doca", 2))
    del engine.behaviours[label("doca", 3)]
    engine.calls.clear()
    summary = run(storage, engine, ["doca"])
    assert sorted(engine.calls) == [label("doca", 2), label("doca", 3)]
    assert (summary.processed, summary.cached, summary.failed) == (2, 1, 0)
    status = storage.get_json(storage.vlm_status_key("doca"))
    assert (status["state"], status["pages_done"]) == ("complete", 3)
    assert storage.get_json(page_key(storage, "doca", 2))["page"] == 2  # the corrupt object was overwritten


def test_a_truncated_page_result_of_a_complete_document_is_redone(
    storage: MemoryStorage, engine: ScriptedEngine
) -> None:
    seed_document(storage, "doca", 3)
    run(storage, engine, ["doca"])
    truncate(storage, page_key(storage, "doca", 1))
    engine.calls.clear()
    summary = run(storage, engine, ["doca"])
    assert engine.calls == [label("doca", 1)]
    assert (summary.processed, summary.cached) == (1, 2)
    assert storage.get_json(storage.vlm_status_key("doca"))["state"] == "complete"
    engine.calls.clear()
    run(storage, engine, ["doca"])  # repaired: nothing more to do
    assert engine.calls == []


def _other_page(storage: MemoryStorage, key: str) -> bytes:
    return storage.get_bytes(page_key(storage, "doca", 1))


def _other_engine(storage: MemoryStorage, key: str) -> bytes:
    record = storage.get_json(key)
    record["engine"] = engine_identity("scripted", "another-model", "v1")
    return json.dumps(record).encode()


def _other_document(storage: MemoryStorage, key: str) -> bytes:
    record = storage.get_json(key)
    record["doc_id"] = "docz"
    return json.dumps(record).encode()


def _other_cache_key(storage: MemoryStorage, key: str) -> bytes:
    record = storage.get_json(key)
    record["cache_key"] = "0" * 32
    return json.dumps(record).encode()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda s, k: b"",
        lambda s, k: b"[]",
        lambda s, k: b"{}",
        lambda s, k: b'{"markdown": "only this"}',
        _other_page,
        _other_engine,
        _other_document,
        _other_cache_key,
    ],
    ids=["empty", "list", "empty-object", "no-key-fields", "other-page", "other-engine", "other-doc", "other-key"],
)
def test_a_page_result_that_does_not_prove_its_key_is_redone(
    storage: MemoryStorage, engine: ScriptedEngine, corrupt: Callable[[MemoryStorage, str], bytes]
) -> None:
    seed_document(storage, "doca", 2)
    run(storage, engine, ["doca"])
    key = page_key(storage, "doca", 2)
    storage.put_bytes(key, corrupt(storage, key), "application/json")
    engine.calls.clear()
    summary = run(storage, engine, ["doca"])
    assert engine.calls == [label("doca", 2)]
    assert (summary.processed, summary.cached, summary.failed) == (1, 1, 0)
    record = storage.get_json(key)
    assert (record["page"], record["doc_id"], record["engine"]) == (2, "doca", IDENTITY)
    markdown = storage.get_bytes(storage.document_md_key("doca")).decode()
    assert "text of doc=doca page=2" in markdown


@pytest.mark.parametrize(
    "garbage",
    [b"\x00\xffgarbage", b"", b"[]", b"{}", b'{"state": "complete"}', b'{"doc_id": "docz", "state": "complete"}'],
    ids=["binary", "empty", "list", "empty-object", "no-fields", "other-doc"],
)
def test_a_garbage_status_is_treated_as_missing_and_rewritten(
    storage: MemoryStorage, engine: ScriptedEngine, garbage: bytes
) -> None:
    """Row 5: an unreadable status.json is no S3 failure: the document is worked on and its status rewritten."""
    seed_document(storage, "doca", 2)
    run(storage, engine, ["doca"])
    storage.put_bytes(storage.vlm_status_key("doca"), garbage, "application/json")
    engine.calls.clear()
    summary = run(storage, engine, ["doca"])
    assert engine.calls == []  # both page results are whole: nothing to ask again
    assert summary.documents == {"doca": "complete"}
    status = storage.get_json(storage.vlm_status_key("doca"))
    assert (status["doc_id"], status["state"], status["pages_done"]) == ("doca", "complete", 2)


def test_eight_garbage_statuses_do_not_make_s3_look_down(storage: MemoryStorage, engine: ScriptedEngine) -> None:
    """Row 5: 8 of 10 documents with a garbage status.json; the 2 healthy ones are not skipped."""
    docs = [f"doc{i}" for i in range(10)]
    for doc_id in docs:
        seed_document(storage, doc_id, 2)
    for doc_id in docs[:8]:
        storage.put_bytes(storage.vlm_status_key(doc_id), b"garbage", "application/json")
    summary = run(storage, engine, docs)
    assert summary.processed == 20 and len(engine.calls) == 20
    assert summary.documents == dict.fromkeys(docs, "complete")
    assert summary.unrecorded == []


def test_a_corrupt_page_manifest_fails_its_document_only(storage: MemoryStorage, engine: ScriptedEngine) -> None:
    """The page manifest belongs to parsed_pages: its document fails with a message that says what to run; the
    other documents are processed, and S3 is not blamed."""
    seed_document(storage, "doca", 2)
    seed_document(storage, "docb", 1)
    storage.put_bytes(storage.page_manifest_key("doca"), b'{"pages": [{"page": "x"}]', "application/json")
    messages: list[str] = []
    with pytest.raises(DocumentsNotProcessed) as failed:
        run(storage, engine, ["doca", "docb"], progress=messages.append)
    assert engine.calls == [label("docb", 1)]
    assert storage.get_json(storage.vlm_status_key("docb"))["state"] == "complete"
    assert not storage.exists(storage.vlm_status_key("doca"))
    message = str(failed.value)
    assert "doca" in message and "page manifest" in message and "parsed_pages" in message and "force" in message
    assert "S3 reachable" not in message
    assert any(m.startswith("doca: NOT PROCESSED") for m in messages)


def test_an_s3_error_reading_a_status_is_still_an_s3_error(storage: MemoryStorage, engine: ScriptedEngine) -> None:
    seed_document(storage, "doca", 1)
    run(storage, engine, ["doca"])
    fail_once(storage, "get", lambda key: key.endswith("status.json"), ConnectionError("Connection reset"))
    with pytest.raises(StorageUnavailable, match="Connection reset"):
        run(storage, engine, ["doca"])


# ---- memory bound by bytes (issue 21 row 6) ---------------------------------------------------------------------


def seed_big_pages(storage: MemoryStorage, doc_id: str, pages: int, png_bytes: int) -> None:
    seed_document(storage, doc_id, pages)
    for n in range(1, pages + 1):  # the page images get their size; the manifest's hashes need not match
        storage.put_bytes(storage.page_png_key(doc_id, n), bytes([n % 256]) * png_bytes, "image/png")


def _slow_everywhere(engine: ScriptedEngine, doc_id: str, pages: int) -> None:
    async def slow(page: PageInput) -> PageResult:
        await asyncio.sleep(0.005)
        return answer(f"text of {page.label}")

    for n in range(1, pages + 1):
        engine.behaviours[label(doc_id, n)] = slow


def test_pages_in_flight_are_bounded_by_their_bytes(storage: MemoryStorage) -> None:
    """The limiter would allow 32 pages at once; 8 MiB pages under a 60 MiB budget allow 3."""
    engine = ScriptedEngine(ScriptedGate(limit=32))
    seed_big_pages(storage, "doca", 24, 8 * 2**20)
    _slow_everywhere(engine, "doca", 24)
    summary = run(storage, engine, ["doca"], memory_budget=60 * 2**20)
    assert summary.processed == 24
    cost = 8 * 2**20 * (1 + 4 / 3) + 2**20  # PNG, its base64 body, an answer
    assert engine.gate.peak == int(60 * 2**20 // cost) == 3
    assert summary.peak_page_bytes <= 60 * 2**20


def test_a_page_costs_the_png_size_its_manifest_recorded(storage: MemoryStorage) -> None:
    """Images kept outside pages/<doc_id>/ are not in the stage's listing; the size parsed_pages recorded
    is used instead of the bound from pixels (3 bytes a pixel), which would admit far fewer pages."""
    engine = ScriptedEngine(ScriptedGate(limit=32))
    seed_document(storage, "doca", 24)
    manifest = storage.get_json(storage.page_manifest_key("doca"))
    for page in manifest["pages"]:
        key = f"elsewhere/doca/{page['page']}.png"
        storage.put_bytes(key, storage.get_bytes(page["png_key"]), "image/png")
        storage.delete(page["png_key"])
        page.update(png_key=key, width_px=1275, height_px=1650, png_bytes=200 * 1024)
    storage.put_json(storage.page_manifest_key("doca"), manifest)
    _slow_everywhere(engine, "doca", 24)
    budget = 30 * 2**20  # the pixel bound (15.7 MiB a page) admits one page; the recorded size, 20
    summary = run(storage, engine, ["doca"], memory_budget=budget)
    assert summary.processed == 24
    assert engine.gate.peak == int(budget // (200 * 1024 * (1 + 4 / 3) + 2**20)) == 20


def test_a_page_larger_than_the_budget_runs_alone(storage: MemoryStorage) -> None:
    engine = ScriptedEngine(ScriptedGate(limit=32))
    seed_big_pages(storage, "doca", 5, 4 * 2**20)
    _slow_everywhere(engine, "doca", 5)
    summary = run(storage, engine, ["doca"], memory_budget=2**20)
    assert summary.processed == 5  # never a deadlock
    assert engine.gate.peak == 1


def test_the_default_budget_does_not_limit_ordinary_pages(storage: MemoryStorage) -> None:
    engine = ScriptedEngine(ScriptedGate(limit=8))
    seed_big_pages(storage, "doca", 40, 300_000)
    _slow_everywhere(engine, "doca", 40)
    run(storage, engine, ["doca"])
    assert 8 <= engine.gate.peak <= 8 + 2  # the limiter's room and the image prefetch, as before


def test_a_rerun_trusts_the_results_its_status_vouches_for_without_reading_them(
    storage: MemoryStorage, engine: ScriptedEngine
) -> None:
    seed_document(storage, "doca", 3)
    run(storage, engine, ["doca"])
    status = storage.get_json(storage.vlm_status_key("doca"))
    listed = {
        k.split("/")[-1].split(".")[0]: storage.head(k).etag for k in storage.keys(storage.vlm_page_prefix("doca"))
    }
    assert status["page_etags"] == listed
    seen = record_ops(storage)
    run(storage, engine, ["doca"])
    assert not [key for op, key in seen if op == "get" and "/pages/" in key and key.startswith("vlm/")]


def test_results_no_status_vouches_for_are_checked_once_then_trusted(
    storage: MemoryStorage, engine: ScriptedEngine
) -> None:
    seed_document(storage, "doca", 2)
    run(storage, engine, ["doca"])
    status = storage.get_json(storage.vlm_status_key("doca"))
    del status["page_etags"]  # a status written before page_etags existed
    storage.put_json(storage.vlm_status_key("doca"), status)
    engine.calls.clear()
    run(storage, engine, ["doca"])  # reads and checks both results, records their ETags
    assert engine.calls == []
    assert len(storage.get_json(storage.vlm_status_key("doca"))["page_etags"]) == 2
    seen = record_ops(storage)
    run(storage, engine, ["doca"])
    assert not [key for op, key in seen if op == "get" and key.startswith("vlm/doca/pages/")]


# ---- routes (issue 19 items 1, 3): text pages are finished by parsed_pages, only vlm pages are sent ----------


def routed(storage: MemoryStorage, files: dict[str, bytes], routing: Any = None) -> dict[str, str]:
    """Ingest and render ``files`` (routing auto unless given); their doc_ids by name."""
    from mkg_pipeline.config import PDFConfig, RoutingConfig
    from mkg_pipeline.ids import doc_id_for
    from mkg_pipeline.stages.ingest import ingest_batch
    from mkg_pipeline.stages.pages import render_batch
    from mkg_pipeline_tests.stages.conftest import drop

    batch = drop(storage, files)
    ingest_batch(storage, batch, PDFConfig())
    render_batch(storage, batch, PDFConfig(), routing=routing or RoutingConfig())
    return {name: doc_id_for(data) for name, data in files.items()}


def test_a_mixed_document_sends_only_its_scanned_page(storage: MemoryStorage, engine: ScriptedEngine) -> None:
    from mkg_pipeline.metrics.client import REGISTRY
    from mkg_pipeline_tests.fixtures.routing_pages import TITLE, mixed_pdf

    doc = routed(storage, {"mixed.pdf": mixed_pdf()})["mixed.pdf"]
    text_before = REGISTRY.get_sample_value("mkg_pipeline_pages_total", {"route": "text"}) or 0
    summary = run(storage, engine, [doc])
    assert engine.calls == [label(doc, 2)]  # one VLM request: the scan
    assert (summary.processed, summary.cached, summary.failed, summary.pages_total) == (1, 0, 0, 2)
    assert summary.text_done == 1
    assert summary.routes == {"text": 1, "vlm": 1} and summary.routes_by_document == {doc: {"text": 1, "vlm": 1}}
    assert REGISTRY.get_sample_value("mkg_pipeline_pages_total", {"route": "text"}) == text_before + 1
    status = storage.get_json(storage.vlm_status_key(doc))
    assert (status["state"], status["pages_done"], status["page_routes"]) == ("complete", 2, {"1": "text", "2": "vlm"})
    assert status["pages_by_route"] == {"text": 1, "vlm": 1}
    markdown = storage.get_bytes(storage.document_md_key(doc)).decode()
    assert markdown.index(TITLE) < markdown.index("<!-- page 2 -->") < markdown.index(f"text of {label(doc, 2)}")
    assert {item["page_idx"] for item in storage.get_json(storage.content_list_key(doc))} == {0, 1}
    # A second run: nothing to ask, nothing to rewrite; refreshing asks the VLM page again, never the text page.
    engine.calls.clear()
    again = run(storage, engine, [doc])
    assert engine.calls == [] and again.documents == {doc: "complete"}
    run(storage, engine, [doc], force_refresh=True)
    assert engine.calls == [label(doc, 2)]
    assert storage.get_json(storage.vlm_status_key(doc))["state"] == "complete"


def test_mode_vlm_sends_every_page_and_an_override_routes_one_document(
    storage: MemoryStorage, engine: ScriptedEngine
) -> None:
    from mkg_pipeline.config import RoutingConfig
    from mkg_pipeline.ids import doc_id_for
    from mkg_pipeline_tests.fixtures.routing_pages import born_digital_pdf, mixed_pdf

    paper = born_digital_pdf()
    routing = RoutingConfig(mode="vlm", overrides={doc_id_for(paper): "auto"})
    docs = routed(storage, {"mixed.pdf": mixed_pdf(), "paper.pdf": paper}, routing)
    summary = run(storage, engine, list(docs.values()))
    assert sorted(engine.calls) == [label(docs["mixed.pdf"], 1), label(docs["mixed.pdf"], 2)]
    assert summary.routes_by_document == {
        docs["mixed.pdf"]: {"text": 0, "vlm": 2},
        docs["paper.pdf"]: {"text": 1, "vlm": 0},
    }
    assert summary.documents == {docs["mixed.pdf"]: "complete", docs["paper.pdf"]: "complete"}


def test_a_text_page_without_its_record_fails_visibly_until_parsed_pages_writes_it(
    storage: MemoryStorage, engine: ScriptedEngine
) -> None:
    from mkg_pipeline.stages.pages import read_page_manifest
    from mkg_pipeline_tests.fixtures.routing_pages import mixed_pdf

    data = mixed_pdf()
    doc = routed(storage, {"mixed.pdf": data})["mixed.pdf"]
    text_page = read_page_manifest(storage, doc)["pages"][0]
    storage.put_bytes(text_page["record_key"], b"{}")  # not the record its key names
    summary = run(storage, engine, [doc])
    assert engine.calls == [label(doc, 2)]  # the text page is never sent to the engine (it has no image)
    (failure,) = storage.get_json(storage.vlm_status_key(doc))["failed_pages"]
    assert (failure["page"], failure["reason"]) == (1, "text_record_missing")
    assert "parsed_pages" in failure["message"] and summary.documents == {doc: "partial"}
    routed(storage, {"mixed.pdf": data})  # parsed_pages again: it writes the record anew
    run(storage, engine, [doc])
    assert storage.get_json(storage.vlm_status_key(doc))["state"] == "complete"


def test_the_audit_accepts_text_route_pages_and_names_a_lost_one(
    storage: MemoryStorage, engine: ScriptedEngine
) -> None:
    from mkg_pipeline.audit import audit_bucket
    from mkg_pipeline.stages.pages import read_page_manifest
    from mkg_pipeline_tests.fixtures.routing_pages import mixed_pdf

    doc = routed(storage, {"mixed.pdf": mixed_pdf()})["mixed.pdf"]
    run(storage, engine, [doc])
    report = audit_bucket(storage, IDENTITY)
    assert report.findings == [], report.to_text()  # no image for the text page, and that is no loss
    assert (report.counts["pages_done"], report.counts["pages_text"]) == (2, 1)
    storage.delete(read_page_manifest(storage, doc)["pages"][0]["record_key"])
    (finding,) = audit_bucket(storage, IDENTITY).findings
    assert finding.kind == "page_unaccounted" and "page(s) 1 " in finding.message
