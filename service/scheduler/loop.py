"""The scheduler: one thread owns the model and runs pages with iteration-level batching.

The thread loads the engine (so loading never blocks the event loop and ``/healthz``
answers while weights are read), warms it up, then repeats one iteration:

1. **retire**: pages whose request was cancelled, timed out or failed leave the batch;
2. **admit**: pages are taken from the page queue (interactive before batch, then fair by client and
   by request: :mod:`.queue`; job pages leave ``reserved_rows`` to interactive ones) into a small
   pool of preprocessing threads, which render them (PDF pages only now), preprocess them to
   uint8 views and tokenize their prompts while the batch decodes; the pages they finished are
   prepared by the engine (vision, prune, prompt): this thread only launches model work.
   At most ``max_rows`` pages are running or ready (``max_batch_size``, or on a GPU measured at
   start-up: :mod:`.capacity`), and one iteration admits pages
   until their visual tokens reach ``max_prefill_tokens``, so one 8-page Gundam PDF does not
   stall every running page's next token for the time of eight vision calls and prefills;
3. **join**: ready pages are prefilled and join the running batch while its KV footprint
   (rows x longest row, padding included) stays within ``max_batch_tokens``. While interactive pages
   decode, a joining page's model work runs in pieces instead (a SAM layer of one view, its pruning, a
   chunk of its prefill), about ``join_budget_ms`` of it between two steps, so the pause between their
   tokens is bounded by a piece, not by the largest page (stall-free joining, as Sarathi-Serve and vLLM's
   chunked prefill); job pages' joining work waits meanwhile;
4. **step**: one decode step for every running page; finished pages leave and their
   request is answered when its last page is done.

With ``batching="static"`` new pages are admitted only when the batch is empty: the
micro-batching of earlier versions, kept to compare against.

Failures stay with their page: a page that fails to render, preprocess, encode or prune
fails its own request; a prefill or decode step that runs out of memory is retried with
fewer pages (evicted pages rejoin, prefilling the tokens they had), and only a page that fails
alone fails its request (503 for out-of-memory).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Literal

from service.engine import Cancelled, OCREngine, OcrOptions, PageResult
from service.engine.decode.contract import DecodeBatch, PrefillsInChunks
from service.engine.device import DeviceLost
from service.engine.engine import PageTask, PreparedPage
from service.engine.stats import Adaptation, StageTimer
from service.errors import NotReady

from .adaptive import QUEUED_SIGNAL_PAGE, AdaptiveRetention, RetentionPolicy
from .capacity import CPU_ROWS, default_row_cap
from .memory import after_failed_call, default_batch_tokens, return_memory_to_os
from .queue import PageQueue, PageRequest, Priority

log = logging.getLogger(__name__)

Batching = Literal["continuous", "static"]
ADAPTIVE_READY_AHEAD = 2  # with adaptive retention: pages prepared ahead of room in the batch


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's knobs (from :class:`~service.settings.ServiceSettings`)."""

    queue_size: int = 128  # pages
    max_batch_size: int | None = None  # pages running at once; None: measured on a GPU, 32 on a CPU
    max_batch_tokens: int | None = None  # KV slots; None: from the device's free memory
    max_prefill_tokens: int = 8192  # visual tokens admitted per iteration
    batch_wait_ms: float = 5.0
    batching: Batching = "continuous"
    retry_after_s: int = 2
    warmup: bool = True
    preprocess_threads: int = 2  # threads that render and preprocess pages ahead of admission
    max_queued_pixels: int | None = None  # pixels of the waiting pages (decoded); None: no bound
    adaptive_target_wait_s: float | None = None  # lower retention when pages wait longer (None: off)
    adaptive_floor: float = 0.5  # ... never below this
    join_budget_ms: float | None = None  # joining work between two decode steps; None: the median step time, 0: off
    prefill_chunk_tokens: int = 512  # a joining prompt's prefill, a chunk at a time while pages decode
    interactive_rows: int | None = None  # rows job pages leave to interactive ones; None: an eighth, at least 1


@dataclass(eq=False)
class Preparing:
    """A page whose model work (each view of its vision encoder, then pruning) runs a piece at a time."""

    request: PageRequest
    index: int
    task: PageTask
    pieces: Generator[None, None, PreparedPage]


@dataclass(eq=False)
class Admitted:
    """A page that has been admitted: its request, its index there, and the engine's state for it."""

    request: PageRequest
    index: int
    page: PreparedPage

    @property
    def sequence(self):
        return self.page.sequence

    @property
    def prefill_tokens(self) -> int:
        """What joining prefills: the prompt, plus the tokens an evicted page had already generated."""
        return self.page.prompt_tokens + len(self.sequence.tokens)


class Scheduler:
    """Loads the engine in its thread, then runs queued pages with continuous batching."""

    def __init__(
        self,
        load_engine: Callable[[], OCREngine],
        config: SchedulerConfig,
        *,
        on_page: Callable[[PageResult, OcrOptions], None] | None = None,
        on_step: Callable[[int], None] | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.config = config
        self._load_engine = load_engine
        self._queue = PageQueue(config.queue_size, config.max_queued_pixels)
        self._on_page = on_page or (lambda result, options: None)
        self._on_step = on_step or (lambda rows: None)
        self._on_fatal = on_fatal or (lambda exc: None)
        self._thread = threading.Thread(target=self._main, name="rtprune-scheduler", daemon=True)
        self._draining = threading.Event()
        self._grace_deadline = float("inf")
        self._ready: deque[Admitted] = deque()  # prepared, waiting for room in the batch
        # pages taken from the queue whose host work (render, preprocess) runs or ran on the pool
        self._host_work: deque[tuple[PageRequest, int, Future[PageTask]]] = deque()
        self._pool = ThreadPoolExecutor(config.preprocess_threads, thread_name_prefix="rtprune-preprocess")
        self._running: dict[int, Admitted] = {}  # id(sequence) -> page in the batch
        self._preparing: deque[Preparing] = deque()  # admitted while pages decode: prepared piece by piece
        self._prefilling: Admitted | None = None  # a ready page whose prompt is prefilled chunk by chunk
        self._step_ms: deque[float] = deque(maxlen=32)  # recent decode steps' durations: the budget's measure
        self._batch: DecodeBatch | None = None
        self._step_times: deque[float] = deque(maxlen=4096)
        self._finished_at: deque[float] = deque(maxlen=4096)  # when pages finished: the rate the queue drains
        self.state: Literal["loading", "ready", "failed", "draining", "stopped"] = "loading"
        self.error: str | None = None
        self.engine: OCREngine | None = None
        self.batch_tokens_limit: int | None = config.max_batch_tokens
        self._busy = False
        self.adaptive = (
            AdaptiveRetention(RetentionPolicy(config.adaptive_target_wait_s, config.adaptive_floor), time.monotonic())
            if config.adaptive_target_wait_s
            else None
        )
        self._set_row_cap(config.max_batch_size or CPU_ROWS)  # measured on a GPU when loading

    def _set_row_cap(self, rows: int) -> None:
        """The row cap (pages running or prepared). With adaptive retention, pages the scheduler would otherwise
        prepare ahead of room in the batch wait in the queue instead (so the level that admits them is
        current): the queue holds them, so turning the policy on leaves the waiting room, and the point where
        requests get 503, where they were. A queued page holds less memory than a prepared one."""
        self.max_rows = self._row_cap = rows  # the cap is lowered after a step ran out of memory, until it empties
        extra = max(0, rows - ADAPTIVE_READY_AHEAD) if self.adaptive is not None else 0
        self._queue.capacity = self.config.queue_size + extra

    # --- the front door's side ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def ensure_ready(self) -> OCREngine:
        """The engine, or NotReady (503) saying whether it is loading, failed or shutting down."""
        if self.state != "ready" or self.engine is None:
            detail = f" (loading failed: {self.error})" if self.state == "failed" else f" ({self.state})"
            raise NotReady(f"the model is not ready{detail}", headers={"Retry-After": str(self.config.retry_after_s)})
        return self.engine

    async def loaded(self, poll_s: float = 0.1) -> None:
        """Return once loading has ended, whether the model is ready or failed (for asyncio callers:
        the job runner before it resumes jobs, a Ray replica's first health check)."""
        while self.state == "loading":
            await asyncio.sleep(poll_s)

    def queue_full(self) -> bool:
        """True when no page slot is free: the front door refuses before reading an upload."""
        return self._queue.full()

    def submit(self, request: PageRequest) -> None:
        """Queue a request's pages, or refuse it at once: not ready, or its pages do not fit the queue."""
        self.ensure_ready()
        self._queue.put(request, self.retry_after_s)  # estimated only when the queue refuses

    def begin_shutdown(self, grace_s: float) -> None:
        """Stop admitting; answer waiting requests 503; let running pages finish within ``grace_s``."""
        if self._draining.is_set():
            return
        self._grace_deadline = time.monotonic() + grace_s
        self._draining.set()
        if self.state == "ready":
            self.state = "draining"
        for request in self._queue.drain():
            request.fail(self._shutting_down())
        self._queue.wake()

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down now (no grace left for running pages) and wait for the thread."""
        self.begin_shutdown(0.0)
        self._grace_deadline = min(self._grace_deadline, time.monotonic())
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.state = "stopped"

    # --- numbers for /metrics and /v1/info ------------------------------------------------------

    @property
    def queued_pages(self) -> int:
        return self._queue.pages

    def queued_by(self, priority: Priority) -> int:
        """Pages of one class (interactive, batch) waiting in the queue."""
        return sum(request.waiting_pages for request in self._queue.waiting(priority))

    @property
    def queue_capacity(self) -> int:
        """Pages that may wait before requests get 503 (``queue_size``, plus what the adaptive policy keeps
        queued instead of prepared)."""
        return self._queue.capacity

    @property
    def running_pages(self) -> int:
        """Pages taken from the queue: decoding, joining, prefilled soon, or being preprocessed."""
        return len(self._model_pages()) + len(self._host_work)

    @property
    def running_requests(self) -> int:
        requests = [r.request for r in self._model_pages()] + [x[0] for x in self._host_work]
        return len({id(request) for request in requests})

    def _model_pages(self) -> list[Admitted | Preparing]:
        """Pages the engine holds: decoding, being prefilled, ready to join, or being prepared piece by piece."""
        prefilling = [self._prefilling] if self._prefilling is not None else []
        return [*self._running.values(), *prefilling, *self._ready, *self._preparing]

    @property
    def join_budget_ms(self) -> float:
        """Joining work (vision views, pruning, prefill chunks) run between two decode steps while pages decode:
        the setting, or the median of the recent steps' time (so a joining page at most about doubles the time
        between tokens, plus its last piece); 0 when off."""
        if self.config.batching == "static":
            return 0.0
        if self.config.join_budget_ms is not None:
            return self.config.join_budget_ms
        steps = sorted(self._step_ms)
        return round(steps[len(steps) // 2], 3) if steps else 0.0

    @property
    def batch_tokens(self) -> int:
        batch = self._batch
        return batch.tokens_in_use if batch is not None else 0

    def retry_after_s(self, window_s: float = 60.0, most_s: int = 600) -> int:
        """When a refused client may expect room: the pages waiting over the rate pages finished in the last
        ``window_s`` (the configured Retry-After while nothing has finished), at most ``most_s``."""
        now = time.monotonic()
        recent = [t for t in list(self._finished_at) if now - t <= window_s]
        if not recent:
            return self.config.retry_after_s
        rate = len(recent) / max(now - recent[0], 1.0)  # pages a second
        return int(min(most_s, max(self.config.retry_after_s, math.ceil(self._queue.pages / rate))))

    def steps_per_s(self, window_s: float = 5.0) -> float:
        now = time.monotonic()
        recent = [t for t in list(self._step_times) if now - t <= window_s]
        return len(recent) / window_s

    # --- the thread -----------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            engine = self._load_engine()
            if self.config.warmup:
                engine.warmup()
            if self.batch_tokens_limit is None:
                self.batch_tokens_limit = default_batch_tokens(engine)
            if self.config.max_batch_size is None:
                self._set_row_cap(default_row_cap(engine, self.batch_tokens_limit))
        except BaseException as exc:  # a failed load must be reported, whatever it was
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("model loading failed: %s", self.error)
            self._on_fatal(exc)
            return
        self.engine, self._batch = engine, engine.new_batch()
        if not self._draining.is_set():
            self.state = "ready"
        log.info(
            "model ready: %s batching, up to %d pages and %s KV tokens at once",
            self.config.batching,
            self.max_rows,
            self.batch_tokens_limit or "the decoder's",
        )
        while True:
            try:
                if not self._iterate():
                    break
            except DeviceLost as exc:
                self._lose_device(exc)
                return
            except BaseException as exc:  # the loop itself must never die with requests waiting
                log.exception("scheduler iteration failed; failing the pages in flight")
                self._fail_in_flight(exc)
        self._fail_in_flight(self._shutting_down())
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _lose_device(self, exc: DeviceLost) -> None:
        """A sticky device error: every later call would fail too. Answer everyone 503 (another replica may
        serve them), report failed (``/readyz`` 503) and ask the process to exit, so it is restarted."""
        log.critical("%s; the service stops so that it can be restarted", exc, exc_info=exc.__cause__)
        self.state, self.error = "failed", str(exc)
        self._fail_in_flight(exc)
        self._on_fatal(exc)

    def _iterate(self) -> bool:
        """One iteration; False when a shutdown has finished draining."""
        self._retire_stopped()
        if self._draining.is_set():
            self._drop_host_work(self._shutting_down())  # not started: answered at once, as the queue was
            if not self._model_pages():
                return False
            if time.monotonic() >= self._grace_deadline:
                self._fail_in_flight(self._shutting_down("its grace period ended before this page finished"))
                return False
        else:
            self._admit()
        if self._in_pieces() or self._preparing or self._prefilling is not None:
            self._join_in_pieces()
        else:
            self._join()
        if self._batch.rows:
            self._step()
            self._busy = True
        elif not self._ready and not self._host_work and not self._preparing:
            if self._busy and not self._queue.pages:  # just went idle: give freed page buffers back
                self._busy = False
                return_memory_to_os()
            self._queue.wait(timeout=0.05)
        return True

    # --- retire -----------------------------------------------------------------------------------

    def _retire_stopped(self) -> None:
        for request in self._queue.stopped():
            request.fail(Cancelled("cancelled while waiting in the queue"))
        stopped = [r for r in self._running.values() if r.request.should_stop()]
        if stopped:
            self._batch.remove([r.sequence for r in stopped])
            for r in stopped:
                del self._running[id(r.sequence)]
                r.request.fail(Cancelled("generation cancelled"))
        for r in [r for r in self._ready if r.request.should_stop()]:
            self._ready.remove(r)
            r.request.fail(Cancelled("cancelled before its prefill"))
        if self._prefilling is not None and self._prefilling.request.should_stop():
            r, self._prefilling = self._prefilling, None
            self._batch.remove([r.sequence])  # forgets its partial prefill
            r.request.fail(Cancelled("cancelled during its prefill"))
        for p in [p for p in self._preparing if p.request.should_stop()]:
            self._preparing.remove(p)
            p.pieces.close()
            p.request.fail(Cancelled("cancelled while its page was encoded"))
        self._drop_host_work(Cancelled("cancelled while being preprocessed"), only_stopped=True)

    def _drop_host_work(self, exc: BaseException, *, only_stopped: bool = False) -> None:
        """Forget pages the pool holds (their requests stopped, or everything: shutdown, failure)."""
        for item in [x for x in self._host_work if not only_stopped or x[0].should_stop()]:
            self._host_work.remove(item)
            item[2].cancel()
            item[0].fail(exc)

    # --- admit --------------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Hand pages to the engine: those whose host work (rendering, preprocessing) the pool has done, in
        queue order, within the row cap and the visual tokens of one iteration. While the batch runs,
        the pool works ahead on the next pages; only an idle batch waits for it."""
        in_flight = len(self._model_pages())
        if self.config.batching == "static" and in_flight:
            return
        room = self.max_rows - in_flight
        if self.adaptive is not None:  # pages wait unpruned in the queue while the batch is full, so the level
            room = min(room, ADAPTIVE_READY_AHEAD - len(self._ready))  # that admits them is the current one
        if room > 0 and not in_flight and not self._host_work and self.config.batch_wait_ms > 0:
            self._queue.wait(timeout=self.config.batch_wait_ms / 1e3, pages=room)  # an idle batch waits for company
        self._start_host_work(max(room, 0) + self.config.preprocess_threads)
        if room <= 0:
            return
        if not in_flight and self._host_work:  # nothing runs: wait for the pool a moment, and for company
            futures = [future for _, _, future in list(self._host_work)[:room]]
            wait(futures[:1], timeout=0.05)
            wait(futures, timeout=self.config.batch_wait_ms / 1e3)
        taken: list[tuple[PageRequest, int, PageTask]] = []
        visual_tokens = 0
        static = self.config.batching == "static"
        # job pages: one an engine call (an interactive page that arrives waits for one page at most), none beside
        # an interactive page, none while interactive pages decode (they stay with the pool rather than hold rows)
        jobs_wait = self._in_pieces() or any(  # nor in the engine call of an interactive page
            request.priority == "interactive" and future.done() for request, _, future in self._host_work
        )
        for item in list(self._host_work):
            if len(taken) >= room or (not static and visual_tokens >= self.config.max_prefill_tokens):
                break
            request, index, future = item
            if (
                request.priority == "batch"
                and not static
                and (jobs_wait or any(t[0].priority == "batch" for t in taken))
            ):
                continue
            if not future.done():
                break  # the batch goes on; this page joins at a later step
            self._host_work.remove(item)
            try:
                task = future.result()
            except Exception as exc:  # the page could not be rendered or preprocessed: its request fails
                request.fail(exc)
                continue
            taken.append((request, index, task))
            visual_tokens += task.visual_tokens
        if not taken:
            return
        if self._in_pieces():  # pages decode: each page's model work runs a piece at a time between their steps
            for request, index, task in taken:
                _line_up(self._preparing, Preparing(request, index, task, self.engine.prepare_in_pieces(task)))
            return
        self._prepare_together(taken)

    def _prepare_together(self, taken: list[tuple[PageRequest, int, PageTask]]) -> None:
        """Prepare pages in one engine call (one vision call per view size, pruning in one pass); each becomes
        ready to join, or fails its own request."""
        try:
            prepared = self.engine.prepare([task for _, _, task in taken])
        except Exception as exc:  # the engine returns per-page failures; anything else fails these pages only
            prepared = [exc] * len(taken)
        for (request, index, _), page in zip(taken, prepared, strict=True):
            if isinstance(page, BaseException):
                request.fail(page)
            else:
                _line_up(self._ready, Admitted(request, index, page))
        for failure in {id(p): p for p in prepared if isinstance(p, BaseException)}.values():
            after_failed_call(failure)  # a lost device ends the loop; the pages above have their answer

    def _start_host_work(self, ahead: int) -> None:
        """Take pages from the queue (round-robin by request) into the preprocessing pool, up to ``ahead``
        in the pool or done and waiting."""
        while len(self._host_work) < ahead:
            item = self._queue.take(batch=self._may_take_batch_page())
            if item is None:
                return
            request, index = item
            accepted = time.monotonic()
            adaptation = self._adapt(request, accepted)
            future = self._pool.submit(self._host_page, request, index, accepted, adaptation)
            self._host_work.append((request, index, future))

    def _adapt(self, request: PageRequest, taken_at: float) -> Adaptation | None:
        """The retention cap of a page taken from the queue now, from how long it waited (None: policy off)."""
        if self.adaptive is None:
            return None
        waiting = self._queue.oldest_waits(taken_at, QUEUED_SIGNAL_PAGE)
        return self.adaptive.admit(request.options, taken_at - request.accepted_at, taken_at, waiting)

    @property
    def retention_level(self) -> float:
        """The adaptive retention cap for pages admitted now (1.0: none, or the policy is off)."""
        return self.adaptive.level if self.adaptive is not None else 1.0

    @property
    def last_queue_wait_s(self) -> float:
        """The adaptive policy's load signal: the median time in the queue of the pages admitted last, or the wait
        so far of the third page still queued when longer."""
        return self.adaptive.signal_s if self.adaptive is not None else 0.0

    def _host_page(
        self, request: PageRequest, index: int, taken_at: float, adaptation: Adaptation | None = None
    ) -> PageTask:
        """On a preprocessing thread: render the page (a PDF page now), preprocess it to uint8 views, tokenize
        its prompt. Never on the scheduler's thread, which only launches model work."""
        timer = StageTimer(self.engine.device)
        timer.add("queue", (taken_at - request.accepted_at) * 1e3)
        with timer.host_stage("preprocess"):
            image = request.document.page(index)
        on_token = functools.partial(request.on_token, index) if request.on_token is not None else None
        task = PageTask(image, request.options, timer, request.should_stop, on_token, adaptation=adaptation)
        return self.engine.prepare_on_host(task, pixels_only=True)

    # --- join -----------------------------------------------------------------------------------------

    def _join(self) -> None:
        """Prefill ready pages into the batch while the KV budget allows; halve on failure."""
        limit = len(self._ready)
        while self._ready and limit:
            joiners = self._fitting(limit)
            if not joiners:
                return
            try:
                finished = self._batch.join([r.sequence for r in joiners])
            except Exception as exc:
                after_failed_call(exc)
                if len(joiners) == 1:
                    self._ready.popleft()
                    joiners[0].request.fail(exc)
                    limit = len(self._ready)
                else:
                    limit = len(joiners) // 2
                    log.warning("prefill of %d pages failed (%s); retrying with %d", len(joiners), exc, limit)
                continue
            for _ in joiners:
                self._ready.popleft()
            for r in joiners:
                self._running[id(r.sequence)] = r
            self._settle(finished)
            limit = len(self._ready)

    def _fitting(self, limit: int) -> list[Admitted]:
        """The longest prefix of the ready pages (at most ``limit``) that fits the KV budget and the
        row cap; at least one page when the batch is empty, so a page larger than the budget still runs."""
        if not self._batch.rows:
            self._row_cap = self.max_rows  # memory trouble ends with the batch it was in
        room = max(0, self._row_cap - len(self._batch.rows))
        joiners: list[Admitted] = []
        for r in list(self._ready)[: min(limit, room)]:
            lengths = [j.prefill_tokens for j in joiners] + [r.prefill_tokens]
            limit = self.batch_tokens_limit
            fits = limit is None or self._batch.footprint_with(lengths) <= limit  # None: the decoder budgets
            if not fits and (joiners or self._batch.rows):
                break
            joiners.append(r)
        return joiners

    @property
    def reserved_rows(self) -> int:
        """Rows batch (job) pages leave to interactive ones: an interactive page that arrives while a long job
        fills the batch joins at once instead of waiting for job pages to finish."""
        if self.config.interactive_rows is not None:
            return min(self.config.interactive_rows, self.max_rows - 1)
        return max(1, self.max_rows // 8) if self.max_rows > 1 else 0

    def _may_take_batch_page(self) -> bool:
        """Whether a job page may be taken from the queue now: job pages leave ``reserved_rows`` to interactive ones,
        and at most ``preprocess_threads`` of them are rendered ahead (an interactive page that arrives is not
        queued behind many job pages in the pool)."""
        engine_pages = sum(1 for page in self._model_pages() if page.request.priority == "batch")
        host_pages = sum(1 for request, _, _ in self._host_work if request.priority == "batch")
        rows_left = engine_pages + host_pages < self.max_rows - self.reserved_rows
        return rows_left and host_pages < self.config.preprocess_threads

    # --- join in pieces, while pages decode -------------------------------------------------------------

    def _in_pieces(self) -> bool:
        """Whether joining work runs in pieces now: interactive pages are decoding (continuous batching) and the
        budget is on. Only someone waiting on a page's tokens minds the pause: with only job pages decoding, or
        none, pages are prepared and prefilled together (faster for them, and for an interactive page joining
        a batch of job pages)."""
        on = self.config.join_budget_ms is None or self.config.join_budget_ms > 0
        return on and self.config.batching == "continuous" and self._readers_waiting()

    def _readers_waiting(self) -> bool:
        return any(r.request.priority == "interactive" for r in self._running.values())

    def _join_in_pieces(self) -> None:
        """Run pieces of joining work until this iteration's budget is spent (at least one piece): a chunk
        of the prefilling page's prompt, else the next page's next vision view or its pruning. Pages that
        were prepared join one at a time through chunked prefill (a batch whose decoder schedules its own
        prefills, vLLM's, takes them whole). With no interactive page decoding there is no budget."""
        budget_s = self.join_budget_ms / 1e3 if self._readers_waiting() else math.inf
        started = time.perf_counter()
        while self._next_piece():
            if time.perf_counter() - started >= budget_s:
                return

    def _next_piece(self) -> bool:
        """One piece of joining work; False when there was none to do. While interactive pages decode, job pages'
        joining work waits (their rows decode on): it would slow every step of the interactive pages, and job
        pages take the turns interactive ones leave. Interactive pages are first in both lines (:func:`_line_up`)."""
        if self._prefilling is not None:
            self._prefill_chunk(self._prefilling)
            return True
        readers = self._readers_waiting()
        if self._ready and (not readers or not isinstance(self._batch, PrefillsInChunks)):
            self._join()  # no reader waits on a decoding page (no pause to bound), or the decoder prefills itself
        elif self._interactive_first() and self._fitting(1):
            self._prefilling = self._ready.popleft()
            return True
        if not readers and self._unstarted_together():
            return False  # one engine call an iteration, as admission makes
        if not self._preparing or (readers and self._preparing[0].request.priority == "batch"):
            return False
        self._prepare_piece(self._preparing[0])
        return True

    def _unstarted_together(self) -> bool:
        """Once no reader waits, pages admitted in pieces whose work has not started are prepared together (within
        ``max_prefill_tokens`` visual tokens; a job page alone), as admission would: pieces are for the pause a
        reader minds."""
        taken: list[Preparing] = []
        visual_tokens = 0
        for page in list(self._preparing):
            if inspect.getgeneratorstate(page.pieces) != inspect.GEN_CREATED:
                continue
            over = visual_tokens + page.task.visual_tokens > self.config.max_prefill_tokens
            if taken and (over or page.request.priority == "batch"):
                break
            taken.append(page)
            visual_tokens += page.task.visual_tokens
            if page.request.priority == "batch":
                break  # one job page an engine call, as admission takes them
        for page in taken:
            self._preparing.remove(page)
            page.pieces.close()
        if taken:
            self._prepare_together([(page.request, page.index, page.task) for page in taken])
        return bool(taken)

    def _interactive_first(self) -> bool:
        """Put the first interactive ready page at the front of the ready line (an evicted job page may be
        there); False when none is ready."""
        page = next((r for r in self._ready if r.request.priority == "interactive"), None)
        if page is None:
            return False
        self._ready.remove(page)
        self._ready.appendleft(page)
        return True

    def _prepare_piece(self, page: Preparing) -> None:
        """The next view or the pruning of a page prepared in pieces; when it is done it is ready to join."""
        try:
            next(page.pieces)
            return
        except StopIteration as done:
            _line_up(self._ready, Admitted(page.request, page.index, done.value))
        except Exception as exc:  # this page only: it could not be encoded or pruned
            page.request.fail(exc)
            after_failed_call(exc)  # a lost device ends the loop; the page above has its answer
        finally:
            if page.pieces.gi_frame is None:  # finished or failed
                self._preparing.remove(page)

    def _prefill_chunk(self, r: Admitted) -> None:
        """The next chunk of a joining page's prefill; once its prompt is in, it joins the batch."""
        try:
            if self._batch.prefill_chunk(r.sequence, self.config.prefill_chunk_tokens):
                self._prefilling = None
                finished = self._batch.join([r.sequence])
                self._running[id(r.sequence)] = r
                self._settle(finished)
        except Exception as exc:  # this page only: the rows that decode are untouched
            self._prefilling = None
            self._batch.remove([r.sequence])
            r.request.fail(exc)
            after_failed_call(exc)

    # --- step -----------------------------------------------------------------------------------------

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            finished = self._batch.step()
        except Exception as exc:
            after_failed_call(exc)
            self._evict_after_failure(exc)
            return
        self._step_ms.append((time.perf_counter() - started) * 1e3)
        self._step_times.append(time.monotonic())
        self._on_step(len(self._batch.rows) + len(finished))
        self._settle(finished)

    def _evict_after_failure(self, exc: Exception) -> None:
        """A failed step is retried with fewer pages: the newest half goes back to the ready list, keeping
        the tokens it generated (it rejoins by prefilling its prompt plus those tokens, so what was
        streamed stays what is returned); a page that fails alone fails."""
        rows = self._batch.rows
        if len(rows) == 1:
            r = self._running.pop(id(rows[0]))
            self._batch.remove(rows)
            r.request.fail(exc)
            return
        evicted = rows[len(rows) // 2 :]
        log.warning("decode step with %d pages failed (%s); evicting %d", len(rows), exc, len(evicted))
        self._row_cap = len(rows) - len(evicted)  # evicted pages rejoin as others finish
        self._batch.remove(evicted)
        for seq in reversed(evicted):
            self._ready.appendleft(self._running.pop(id(seq)))

    def _settle(self, finished) -> None:
        for seq in finished:
            r = self._running.pop(id(seq), None)
            if r is None:
                continue
            result = self.engine.page_result(r.page)
            self._finished_at.append(time.monotonic())
            if isinstance(result, BaseException):
                r.request.fail(result)
                continue
            self._on_page(result, r.request.options)
            r.request.record(r.index, result)

    # --- failure and shutdown -----------------------------------------------------------------------

    def _fail_in_flight(self, exc: BaseException) -> None:
        if self._batch is not None:
            prefilling = [self._prefilling.sequence] if self._prefilling is not None else []
            self._batch.remove([*self._batch.rows, *prefilling])  # a partial prefill's cache goes too
        for page in self._model_pages():
            page.request.fail(exc)
        for page in self._preparing:
            page.pieces.close()
        self._running.clear()
        self._ready.clear()
        self._preparing.clear()
        self._prefilling = None
        self._drop_host_work(exc)
        for request in self._queue.drain():
            request.fail(exc)

    def _shutting_down(self, why: str = "") -> NotReady:
        detail = f": {why}" if why else ""
        return NotReady(
            f"the service is shutting down{detail}; retry on another replica or shortly",
            headers={"Retry-After": str(self.config.retry_after_s)},
        )


def _line_up(line: deque, page: Admitted | Preparing) -> None:
    """Add a page to a line of pages (ready, or being prepared): an interactive page goes ahead of every batch
    page, behind the interactive ones already there."""
    if page.request.priority == "interactive":
        for position, other in enumerate(line):
            if other.request.priority == "batch":
                line.insert(position, page)
                return
    line.append(page)
