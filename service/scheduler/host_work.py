"""Pages taken from the queue onto the preprocessing pool: the scheduler's host-side half (see :mod:`.loop`).

A small pool of threads renders pages (PDF pages only now), preprocesses them to uint8 views and
tokenizes their prompts while the batch decodes, so the scheduler's thread only launches model work.
Job pages leave ``reserved_rows`` to interactive ones, and at most ``preprocess_threads`` of them are
rendered ahead, so an interactive page that arrives is not queued behind a job in the pool.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from service.engine import OCREngine
from service.engine.page import PageTask
from service.engine.stats import Adaptation, StageTimer

from .adaptive import QUEUED_SIGNAL_PAGE, AdaptiveRetention
from .config import SchedulerConfig
from .joining import Admitted, Preparing
from .queue import PageQueue, PageRequest


class HostWork:
    """The scheduler's preprocessing pool (a mixin of :class:`~.loop.Scheduler`, which owns the state)."""

    config: SchedulerConfig
    adaptive: AdaptiveRetention | None
    max_rows: int
    _queue: PageQueue
    _pool: ThreadPoolExecutor
    _host_work: deque[tuple[PageRequest, int, Future[PageTask]]]

    if TYPE_CHECKING:  # the scheduler's and the joining half's (declared, not defined: the MRO must find theirs)

        @property
        def _loaded(self) -> OCREngine: ...

        def _model_pages(self) -> list[Admitted | Preparing]: ...

        def _in_pieces(self) -> bool: ...

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

    def _drop_host_work(self, exc: BaseException, *, only_stopped: bool = False) -> None:
        """Forget pages the pool holds (their requests stopped, or everything: shutdown, failure)."""
        for item in [x for x in self._host_work if not only_stopped or x[0].should_stop()]:
            self._host_work.remove(item)
            item[2].cancel()
            item[0].fail(exc)

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
        timer = StageTimer(self._loaded.device)
        timer.add("queue", (taken_at - request.accepted_at) * 1e3)
        with timer.host_stage("preprocess"):
            image = request.document.page(index)
        on_token = functools.partial(request.on_token, index) if request.on_token is not None else None
        task = PageTask(image, request.options, timer, request.should_stop, on_token, adaptation=adaptation)
        return self._loaded.prepare_on_host(task, pixels_only=True)

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

    def _done_on_host(self, room: int) -> list[tuple[PageRequest, int, PageTask]]:
        """Pages whose host work is done, taken off the pool in queue order: at most ``room`` of them and
        ``max_prefill_tokens`` visual tokens; a page whose rendering or preprocessing failed fails its request."""
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
            visual_tokens += task.prepared_tokens
        return taken
