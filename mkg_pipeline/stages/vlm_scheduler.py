"""The vlm stage's scheduler: starts a document's pages as fast as the client's limiter has room for them.

The number of pages in flight follows the limiter (the server's measured capacity), never a config knob.
Enough pages beyond its limit fetch their image ahead (:func:`prefetch_margin`) that a freed slot finds one
ready, and the pages in flight are bounded by the bytes they hold (``workers.vlm_page_memory_mb``), never
by batch size; a page larger than the budget runs alone. The scheduler waits for room on what makes it
(a page reaching the engine, leaving it or ending; the limiter's own capacity), never on a timer.
"""

from __future__ import annotations

import asyncio
import math
import time

from mkg_pipeline.stages.vlm_assembly import DocumentAssembler
from mkg_pipeline.stages.vlm_page import PageWorker
from mkg_pipeline.stages.vlm_run import CapacityGate, Document, PageJob, RunContext, log

#: seconds between progress summaries in the step log (per page lines would be 100 per second)
SUMMARY_EVERY_S = 10.0
#: default bytes of pages in flight (config ``workers.vlm_page_memory_mb``)
DEFAULT_MEMORY_BUDGET = 1536 * 1024 * 1024


class _Mean:
    """An exponentially weighted mean of durations (None before the first)."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.value: float | None = None

    def observe(self, seconds: float) -> None:
        self.value = seconds if self.value is None else self.value + self.weight * (seconds - self.value)


def prefetch_margin(limit: int, fetch_s: float | None, answer_s: float | None) -> int:
    """Pages to start beyond the limiter's limit, so that one is ready whenever a slot frees.

    Slots free at ``limit / answer_s`` a second and a page takes ``fetch_s`` to be ready (its image read
    from S3): twice as many as free during one fetch, at least ``max(2, limit // 8)``, at most the limit
    (the byte budget bounds their memory in any case).
    """
    least = max(2, limit // 8)
    if not fetch_s or not answer_s:
        return least
    return max(least, min(limit, math.ceil(2 * limit * fetch_s / answer_s)))


class PageScheduler:
    """Admits pages against the limiter's room and the byte budget, and runs each as a task."""

    def __init__(
        self,
        run: RunContext,
        gate: CapacityGate,
        worker: PageWorker,
        assembler: DocumentAssembler,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        self.run = run
        self.gate = gate
        self.worker = worker
        self.assembler = assembler
        self.memory_budget = memory_budget
        self.bytes_held = 0  # what the pages in flight hold (their jobs' cost), admitted against the budget
        self.peak_bytes_held = 0
        self.preparing = 0  # page tasks that have not reached the engine yet (not seen by the limiter)
        self.tasks: set[asyncio.Task[None]] = set()
        self.changed = asyncio.Event()
        #: how long a page's image takes to fetch, and a page's request to be answered (for the prefetch)
        self.fetch_s = _Mean()
        self.answer_s = _Mean()

    def _has_room(self) -> bool:
        gate = self.gate
        limit = gate.limit
        busy = gate.in_flight + gate.waiting + self.preparing
        # The limiter is the throughput knob. Pages beyond it fetch their image ahead, so a request can
        # start the moment a slot frees; the second bound only caps memory if requests stall.
        margin = prefetch_margin(limit, self.fetch_s.value, self.answer_s.value)
        return busy < limit + margin and len(self.tasks) < 2 * limit + 16

    def _bytes_fit(self, cost: int) -> bool:
        # A page larger than the whole budget still runs, alone: nothing else is admitted beside it.
        return self.bytes_held == 0 or self.bytes_held + cost <= self.memory_budget

    async def _wait_for_room(self, cost: int = 0) -> None:
        """Until the next page may start; woken by what makes room, never by a timer.

        Room is made by a page of this run reaching the engine, leaving it or ending (``changed``), or, while the
        limiter is what binds, by the limiter itself: a request of the process releasing its slot, or a
        reading of the server raising the limit (``wait_for_capacity``). A cold pod is thus woken by the
        reading that grows its limit, not by the next poll.
        """
        while not (self._has_room() and self._bytes_fit(cost)):
            self.changed.clear()
            waits = [asyncio.ensure_future(self.changed.wait())]
            gate = self.gate
            if gate.in_flight + gate.waiting >= gate.limit:
                waits.append(asyncio.ensure_future(gate.wait_for_capacity()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()

    def _spawn(self, job: PageJob) -> None:
        self.preparing += 1
        self.bytes_held += job.cost
        self.peak_bytes_held = max(self.peak_bytes_held, self.bytes_held)
        task = asyncio.create_task(self._page(job), name=job.label)
        self.tasks.add(task)
        task.add_done_callback(self._page_done)

    async def _page(self, job: PageJob) -> None:
        events = _PageProgress(self)
        try:
            await self.worker.page(job, events)
        finally:
            if not events.fetched:
                self.preparing -= 1
            self.bytes_held -= job.cost
            self.changed.set()
            self.assembler.maybe_assemble(job.doc)

    def _page_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.changed.set()
        if not task.cancelled() and task.exception() is not None:  # the worker records every error itself
            log.error("page task %s crashed: %r", task.get_name(), task.exception())

    async def run_document(self, doc: Document, todo: list[PageJob]) -> None:
        for job in todo:
            await self._wait_for_room(job.cost)
            if self.run.s3_down:  # no point queueing pages that cannot be read or recorded; the next run resumes
                self.run.summary.unrecorded.append(doc.doc_id)
                return
            if not self.run.holds_claim():  # the batch is another run's now: it does this page
                return
            self._spawn(job)
        doc.scheduled_all = True
        self.assembler.maybe_assemble(doc)

    async def report_progress(self, started: float) -> None:
        from mkg_pipeline.progress import rate_and_eta  # here: this method is all that uses it

        while True:
            await asyncio.sleep(SUMMARY_EVERY_S)
            s = self.run.summary
            elapsed = time.monotonic() - started
            # Rate and ETA over the pages the server works on this run (answered or failed); cached pages cost
            # nothing. The total is of the pages seen so far: documents still to open add to it.
            rate = rate_and_eta(s.processed + s.failed, max(s.pages_total - s.cached, 0), elapsed)
            self.run.progress(
                f"progress: {s.processed} processed, {s.cached} cached, {s.failed} failed of {s.pages_total} pages "
                f"seen; {rate}; requests in flight {self.gate.in_flight}, "
                f"limit {self.gate.limit}; pages in flight hold {self.bytes_held / 2**20:.0f} of "
                f"{self.memory_budget / 2**20:.0f} MiB"
                + (f"; failures so far: {dict(s.failure_reasons)}" if s.failed else "")
            )


class _PageProgress:
    """One page's events (:class:`~.vlm_page.PageEvents`), as the scheduler counts them."""

    def __init__(self, scheduler: PageScheduler) -> None:
        self.scheduler = scheduler
        self.fetched = False

    def image_fetched(self, seconds: float) -> None:
        scheduler = self.scheduler
        scheduler.fetch_s.observe(seconds)
        scheduler.preparing -= 1  # now seen by the limiter (in flight or waiting for a slot)
        self.fetched = True
        scheduler.changed.set()

    def left_engine(self, seconds: float | None) -> None:
        if seconds is not None:
            self.scheduler.answer_s.observe(seconds)
        # Its slot is free: room for the next page now, not once this one is stored.
        self.scheduler.changed.set()
