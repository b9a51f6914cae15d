"""One worker thread owns the model; requests wait for it in a bounded queue and run in micro-batches.

The thread loads the engine (so loading never blocks the event loop and ``/healthz``
answers while weights are read), warms it up, then takes jobs off the queue. The HTTP
side only submits jobs and awaits their futures: a full queue is refused at once
(503), and a job whose deadline passed or whose client left is cancelled, both while
it waits and between decode steps, so the device never works for nobody.

Micro-batching: jobs already waiting join the one just taken, then the worker waits up to
``batch_wait_ms`` for more, until ``max_batch_size`` pages are together, and runs them as one
batch (``OCREngine.run_batch``); a multi-page job larger than that runs in several batches.
Requests do not join a batch that is already decoding (no continuous batching yet).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

import torch
from PIL import Image

from service.engine import Cancelled, OCREngine, OcrOptions, PageResult
from service.engine.engine import PageTask
from service.engine.stats import StageTimer
from service.errors import NotReady, OutOfMemory, Overloaded

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request's pages and options, and the handles to cancel it and collect its result."""

    pages: list[Image.Image]
    options: OcrOptions
    deadline: float  # time.monotonic() after which the job is abandoned
    request_id: str = "-"
    accepted_at: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)

    def should_stop(self) -> bool:
        return self.cancel.is_set() or time.monotonic() > self.deadline


class Worker:
    """Loads the engine in its thread, then runs queued jobs in micro-batches."""

    def __init__(
        self,
        load_engine: Callable[[], OCREngine],
        *,
        queue_size: int,
        max_batch_size: int = 1,
        batch_wait_ms: float = 0.0,
        warmup: bool = True,
        on_page: Callable[[PageResult], None] | None = None,
        on_depth: Callable[[int, int], None] | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._load_engine = load_engine
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._warmup = warmup
        self._max_batch_size = max(1, max_batch_size)
        self._batch_wait_s = batch_wait_ms / 1e3 if max_batch_size > 1 else 0.0
        self._on_page = on_page or (lambda result: None)
        self._on_depth = on_depth or (lambda waiting, running: None)
        self._on_fatal = on_fatal or (lambda exc: None)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name="rtprune-worker", daemon=True)
        self.state: Literal["loading", "ready", "failed", "stopped"] = "loading"
        self.error: str | None = None
        self.engine: OCREngine | None = None
        self.running = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs, fail those still waiting, and wait for the current one."""
        self._stopping.set()
        self._thread.join(timeout)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            _fail(job, NotReady("the service is shutting down"))
        self.state = "stopped"

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def ensure_ready(self, retry_after_s: int) -> OCREngine:
        """The engine, or NotReady (503) saying whether it is still loading or failed to load."""
        if self.state != "ready" or self.engine is None:
            detail = f" (loading failed: {self.error})" if self.state == "failed" else f" ({self.state})"
            raise NotReady(f"the model is not ready{detail}", headers={"Retry-After": str(retry_after_s)})
        return self.engine

    def submit(self, job: Job, retry_after_s: int) -> None:
        """Queue a job, or refuse at once: not ready, or the queue is full."""
        self.ensure_ready(retry_after_s)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(
                f"all {self._queue.maxsize} queue slots are taken; retry shortly",
                headers={"Retry-After": str(retry_after_s)},
            ) from None
        self._report_depth()

    def _report_depth(self) -> None:
        self._on_depth(self._queue.qsize(), self.running)

    def _main(self) -> None:
        try:
            engine = self._load_engine()
            if self._warmup:
                engine.warmup()
        except BaseException as exc:  # a failed load must be reported, whatever it was
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("model loading failed: %s", self.error)
            self._on_fatal(exc)
            return
        self.engine, self.state = engine, "ready"
        log.info("model ready (max batch size %d)", self._max_batch_size)
        while not self._stopping.is_set():
            try:
                job = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self._process(self._collect(job))

    def _collect(self, first: Job) -> list[Job]:
        """Jobs already waiting join the first at once; then the window waits for more, up to the batch size
        in pages. With a zero window only what queued up while the previous batch ran is batched."""
        jobs, pages = [first], len(first.pages)
        deadline = time.monotonic() + self._batch_wait_s
        while pages < self._max_batch_size:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            jobs.append(job)
            pages += len(job.pages)
        return jobs

    def _process(self, jobs: list[Job]) -> None:
        """Run the pages of ``jobs`` in chunks of the batch size; settle each job's future."""
        units: list[tuple[Job, int]] = []
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                continue
            if job.should_stop():
                _fail(job, Cancelled("cancelled while waiting in the queue"))
                continue
            units += [(job, index) for index in range(len(job.pages))]
        results: dict[int, list[PageResult]] = {id(job): [] for job, _ in units}
        self.running = len({id(job) for job, _ in units})
        self._report_depth()
        try:
            for start in range(0, len(units), self._max_batch_size):
                chunk = [
                    (job, index) for job, index in units[start : start + self._max_batch_size] if not job.future.done()
                ]
                if chunk:
                    self._run_chunk(chunk, results)
        finally:
            self.running = 0
            self._report_depth()

    def _run_chunk(self, chunk: list[tuple[Job, int]], results: dict[int, list[PageResult]]) -> None:
        now = time.monotonic()
        tasks = []
        for job, index in chunk:
            timer = StageTimer(self.engine.device)
            timer.add("queue", (now - job.accepted_at) * 1e3)
            tasks.append(PageTask(job.pages[index], job.options, timer, job.should_stop))
        try:
            outcomes = self.engine.run_batch(tasks)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("out of memory on a batch of %d pages", len(tasks))
            for job, _ in chunk:
                _fail(
                    job,
                    OutOfMemory(
                        "the device ran out of memory on this request; retry with a smaller mode, "
                        "fewer pages or a smaller RTPRUNE_MAX_BATCH_SIZE",
                        headers={"Retry-After": "5"},
                    ),
                )
            return
        except BaseException as exc:  # one batch's failure must never stop the worker
            for job, _ in chunk:
                _fail(job, exc)
            return
        if len(outcomes) != len(tasks):  # the batch contract: one outcome per page
            outcomes = [RuntimeError(f"engine returned {len(outcomes)} results for {len(tasks)} pages")] * len(tasks)
        for (job, index), outcome in zip(chunk, outcomes, strict=True):
            if job.future.done():
                continue
            if isinstance(outcome, BaseException):
                _fail(job, outcome)
                continue
            self._on_page(outcome)
            results[id(job)].append(outcome)
            if index == len(job.pages) - 1:
                job.future.set_result(results[id(job)])


def _fail(job: Job, exc: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(exc)
