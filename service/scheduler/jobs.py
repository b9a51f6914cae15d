"""Requests as the scheduler sees them: jobs of pages, and a fair queue that counts pages.

A :class:`Job` is one request: a document, its options, a deadline and a future that
resolves to the pages' results in order. The :class:`PageQueue` holds jobs but counts
and hands out **pages**, one at a time, round-robin over jobs: a 50-page PDF gives up
its turn after each page, so a single image that arrives behind it waits for one page,
not fifty.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from service.engine import OcrOptions, PageResult
from service.errors import Overloaded
from service.inputs import Document


@dataclass(eq=False)
class Job:
    """One request's pages and options, the handles to cancel it, and its result."""

    document: Document
    options: OcrOptions
    deadline: float  # time.monotonic() after which the job is abandoned
    request_id: str = "-"
    accepted_at: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)
    on_page: Callable[[int, PageResult], None] | None = None  # progress: (page index, result)
    on_token: Callable[[int, int, int], None] | None = None  # streaming: (page index, position, token id)
    next_page: int = 0  # pages before this one have been handed to the scheduler
    results: dict[int, PageResult] = field(default_factory=dict)

    @property
    def pages(self) -> int:
        return len(self.document)

    @property
    def waiting_pages(self) -> int:
        return self.pages - self.next_page

    def should_stop(self) -> bool:
        """Cancelled, past its deadline, or already settled (e.g. another page failed)."""
        return self.cancel.is_set() or self.future.done() or time.monotonic() > self.deadline

    def record(self, index: int, result: PageResult) -> None:
        """Store one page's result; the future resolves when the last page is in."""
        if self.future.done():
            return
        self.results[index] = result
        if self.on_page is not None:
            self.on_page(index, result)
        if len(self.results) == self.pages:
            self.future.set_result([self.results[i] for i in range(self.pages)])

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class PageQueue:
    """Jobs waiting for the model, counted in pages and served one page per job in turn."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._jobs: deque[Job] = deque()
        self._pages = 0
        self._changed = threading.Condition()

    @property
    def pages(self) -> int:
        """Pages waiting (not yet handed to the scheduler)."""
        return self._pages

    def full(self) -> bool:
        return self._pages >= self.capacity

    def put(self, job: Job, retry_after_s: int) -> None:
        """Queue all of ``job``'s pages, or refuse it whole (Overloaded, 503) if they do not fit."""
        with self._changed:
            free = self.capacity - self._pages
            if job.pages > free:
                what = "the queue is full" if free <= 0 else f"only {free} of {self.capacity} page slots are free"
                raise Overloaded(
                    f"{what} and the document has {job.pages} page(s); retry shortly",
                    headers={"Retry-After": str(retry_after_s)},
                )
            self._jobs.append(job)
            self._pages += job.pages
            self._changed.notify_all()

    def take(self) -> tuple[Job, int] | None:
        """The next page, round-robin by job. Jobs that should stop are passed over here and
        removed by :meth:`stopped`, so the scheduler can fail them."""
        with self._changed:
            for _ in range(len(self._jobs)):
                job = self._jobs.popleft()
                if job.should_stop():
                    self._jobs.append(job)
                    continue
                index = job.next_page
                job.next_page += 1
                self._pages -= 1
                if job.waiting_pages:
                    self._jobs.append(job)  # back of the line: the next page is another job's
                return job, index
            return None

    def stopped(self) -> list[Job]:
        """Remove and return the jobs that should stop (cancelled, past their deadline, failed)."""
        with self._changed:
            gone = [job for job in self._jobs if job.should_stop()]
            if gone:
                self._jobs = deque(job for job in self._jobs if not job.should_stop())
                self._pages = sum(job.waiting_pages for job in self._jobs)
            return gone

    def drain(self) -> list[Job]:
        """Remove and return every waiting job."""
        with self._changed:
            jobs, self._jobs, self._pages = list(self._jobs), deque(), 0
            return jobs

    def wait(self, timeout: float, pages: int = 1) -> bool:
        """Block until at least ``pages`` pages wait, or ``timeout`` seconds pass."""
        with self._changed:
            return self._changed.wait_for(lambda: self._pages >= pages, timeout)

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()
