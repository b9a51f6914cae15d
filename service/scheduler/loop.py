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

The class is cut in three along those lines: this module has the front door's side, the thread and the
iteration (retire, admit); :mod:`.host_work` the preprocessing pool; :mod:`.joining` the join, the
pieces, the step and eviction.

Failures stay with their page: a page that fails to render, preprocess, encode or prune
fails its own request; a prefill or decode step that runs out of memory is retried with
fewer pages (evicted pages rejoin, prefilling the tokens they had), and only a page that fails
alone fails its request (503 for out-of-memory).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Literal

from service.engine import Cancelled, OCREngine, OcrOptions, PageResult
from service.engine.decode.contract import DecodeBatch
from service.engine.device import DeviceLost
from service.engine.page import PageTask
from service.errors import NotReady

from .adaptive import AdaptiveRetention, RetentionPolicy
from .capacity import CPU_ROWS, default_row_cap
from .config import SchedulerConfig
from .host_work import HostWork
from .joining import Admitted, Joining, Preparing, line_up
from .memory import default_batch_tokens, return_memory_to_os
from .queue import PageQueue, PageRequest, Priority

log = logging.getLogger(__name__)

ADAPTIVE_READY_AHEAD = 2  # with adaptive retention: pages prepared ahead of room in the batch


class Scheduler(HostWork, Joining):
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

    @property
    def random_weights(self) -> bool:
        """Whether the loaded model has random weights (answers say so); False before it has loaded."""
        return self.engine is not None and self.engine.random_weights

    @property
    def _loaded(self) -> OCREngine:
        """The engine, on the scheduler's thread once it has loaded (the only place the loop runs)."""
        assert self.engine is not None, "the engine is used only after it has loaded"
        return self.engine

    @property
    def _decoding(self) -> DecodeBatch:
        """The running batch, on the scheduler's thread once the engine has loaded."""
        assert self._batch is not None, "the batch exists once the engine has loaded"
        return self._batch

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
        if self._decoding.rows:
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
            self._decoding.remove([r.sequence for r in stopped])
            for r in stopped:
                del self._running[id(r.sequence)]
                r.request.fail(Cancelled("generation cancelled"))
        for r in [r for r in self._ready if r.request.should_stop()]:
            self._ready.remove(r)
            r.request.fail(Cancelled("cancelled before its prefill"))
        if self._prefilling is not None and self._prefilling.request.should_stop():
            r, self._prefilling = self._prefilling, None
            self._decoding.remove([r.sequence])  # forgets its partial prefill
            r.request.fail(Cancelled("cancelled during its prefill"))
        for p in [p for p in self._preparing if p.request.should_stop()]:
            self._preparing.remove(p)
            p.pieces.close()
            p.request.fail(Cancelled("cancelled while its page was encoded"))
        self._drop_host_work(Cancelled("cancelled while being preprocessed"), only_stopped=True)

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
        taken = self._done_on_host(room)
        if not taken:
            return
        if self._in_pieces():  # pages decode: each page's model work runs a piece at a time between their steps
            for request, index, task in taken:
                line_up(self._preparing, Preparing(request, index, task, self._loaded.prepare_in_pieces(task)))
            return
        self._prepare_together(taken)

    # --- failure and shutdown -----------------------------------------------------------------------

    def _fail_in_flight(self, exc: BaseException) -> None:
        if self._batch is not None:
            prefilling = [self._prefilling.sequence] if self._prefilling is not None else []
            self._decoding.remove([*self._decoding.rows, *prefilling])  # a partial prefill's cache goes too
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
