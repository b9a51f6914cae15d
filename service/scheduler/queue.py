"""Requests as the scheduler sees them, and a fair queue that counts pages.

A :class:`PageRequest` is one request: a document, its options, a deadline and a future that
resolves to the pages' results in order. The :class:`PageQueue` holds requests but counts
and hands out **pages**, one at a time:

- **interactive before batch**: a page of a request someone waits on (the form, chat and Mistral doors)
  goes before any job page (jobs are ``batch`` unless they ask otherwise), so a 1,000-page job does not
  make an interactive reader wait; job pages take every turn interactive pages leave;
- **fair by client, then by request**: within a class, clients take turns, one page each, and a client's
  requests take turns within its share: a client with 50 requests waiting gets the turns of a client with
  one, and a 50-page PDF gives up its turn after each page.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

from service.engine import OcrOptions, PageResult
from service.errors import Overloaded
from service.inputs import Document

Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")  # the order classes are served in


@dataclass(eq=False)
class PageRequest:
    """One request's pages and options, the handles to cancel it, and its result."""

    document: Document
    options: OcrOptions
    deadline: float  # time.monotonic() after which the request is abandoned
    request_id: str = "-"
    accepted_at: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)
    on_page: Callable[[int, PageResult], None] | None = None  # progress: (page index, result)
    on_token: Callable[[int, int, int], None] | None = None  # streaming: (page index, position, token id)
    client: str = "-"  # who sent it (turns are fair by client): the caller's address, or a job's owner
    priority: Priority = "interactive"
    next_page: int = 0  # pages before this one have been handed to the scheduler
    results: dict[int, PageResult] = field(default_factory=dict)

    @property
    def pages(self) -> int:
        return len(self.document)

    @property
    def waiting_pages(self) -> int:
        return self.pages - self.next_page

    @property
    def waiting_pixels(self) -> int:
        return sum(self.document.pixels[self.next_page :])

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
    """Requests waiting for the model, counted in pages and served one page at a time: interactive before batch,
    then clients in turn, then each client's requests in turn."""

    def __init__(self, capacity: int, max_pixels: int | None = None) -> None:
        self.capacity = capacity
        self.max_pixels = max_pixels  # pixels of the waiting pages, decoded (None: no bound)
        # class -> client -> its waiting requests; a dict keeps the clients' turn order (the next is first)
        self._lanes: dict[Priority, dict[str, deque[PageRequest]]] = {priority: {} for priority in PRIORITIES}
        self._pages = 0
        self._pixels = 0
        self._changed = threading.Condition()

    @property
    def pages(self) -> int:
        """Pages waiting (not yet handed to the scheduler)."""
        return self._pages

    def full(self) -> bool:
        return self._pages >= self.capacity

    @property
    def pixels(self) -> int:
        """Pixels the waiting pages will take once decoded or rendered."""
        return self._pixels

    def waiting(self, priority: Priority | None = None) -> list[PageRequest]:
        """The requests with pages waiting (of one class, or all)."""
        with self._changed:
            lanes = [self._lanes[priority]] if priority else list(self._lanes.values())
            return [request for lane in lanes for requests in lane.values() for request in requests]

    def put(self, request: PageRequest, retry_after_s: int | Callable[[], int]) -> None:
        """Queue all of ``request``'s pages, or refuse it whole (Overloaded, 503) if they do not fit the page
        slots or the pixel budget. ``retry_after_s`` may be a function: it is then asked only on a refusal."""
        with self._changed:
            free = self.capacity - self._pages
            pixels = sum(request.document.pixels)
            refusal = None
            if request.pages > free:
                what = "the queue is full" if free <= 0 else f"only {free} of {self.capacity} page slots are free"
                refusal = f"{what} and the document has {request.pages} page(s); retry shortly"
            elif self.max_pixels is not None and self._pixels and self._pixels + pixels > self.max_pixels:
                refusal = (
                    f"the pages waiting already add up to {self._pixels:,} pixels of the {self.max_pixels:,} the "
                    f"queue holds, and this document has {pixels:,}; retry shortly"
                )
            if refusal is not None:
                retry = retry_after_s() if callable(retry_after_s) else retry_after_s
                raise Overloaded(refusal, headers={"Retry-After": str(retry)})
            self._lanes[request.priority].setdefault(request.client, deque()).append(request)
            self._pages += request.pages
            self._pixels += pixels
            self._changed.notify_all()

    def oldest_waits(self, now: float, n: int) -> list[float]:
        """How long the ``n`` pages that arrived first among those still waiting have waited so far, longest
        first (fewer when fewer wait)."""
        with self._changed:
            waits: list[float] = []
            # every request here has a page waiting, so the n oldest pages are among the n oldest requests
            for request in heapq.nsmallest(n, self.waiting(), key=lambda r: r.accepted_at):
                waits += [now - request.accepted_at] * min(request.waiting_pages, n - len(waits))
                if len(waits) >= n:
                    break
            return waits

    def take(self, *, batch: bool = True) -> tuple[PageRequest, int] | None:
        """The next page: of the first class with one waiting, the next client's, that client's next request's
        (``batch=False``: interactive pages only). Requests that should stop are passed over here and removed by
        :meth:`stopped`, so the scheduler can fail them."""
        with self._changed:
            for priority, lane in self._lanes.items():
                if priority == "batch" and not batch:
                    break
                for client in list(lane):
                    requests = lane.pop(client)  # this client's turn is used now: it goes to the back
                    request = next((r for r in requests if not r.should_stop()), None)
                    lane[client] = requests
                    if request is None:
                        continue
                    requests.remove(request)
                    index = request.next_page
                    request.next_page += 1
                    self._pages -= 1
                    self._pixels -= request.document.pixels[index] if request.document.pixels else 0
                    if request.waiting_pages:
                        requests.append(request)  # back of its client's line: the next is another request's
                    elif not requests:
                        del lane[client]
                    return request, index
            return None

    def stopped(self) -> list[PageRequest]:
        """Remove and return the requests that should stop (cancelled, past their deadline, failed)."""
        with self._changed:
            gone = [request for request in self.waiting() if request.should_stop()]
            if gone:
                for lane in self._lanes.values():
                    for client, requests in list(lane.items()):
                        kept = deque(request for request in requests if not request.should_stop())
                        if kept:
                            lane[client] = kept
                        else:
                            del lane[client]
                self._pages = sum(request.waiting_pages for request in self.waiting())
                self._pixels = sum(request.waiting_pixels for request in self.waiting())
            return gone

    def drain(self) -> list[PageRequest]:
        """Remove and return every waiting request."""
        with self._changed:
            requests = self.waiting()
            self._lanes = {priority: {} for priority in PRIORITIES}
            self._pages = self._pixels = 0
            return requests

    def wait(self, timeout: float, pages: int = 1) -> bool:
        """Block until at least ``pages`` pages wait, or ``timeout`` seconds pass."""
        with self._changed:
            return self._changed.wait_for(lambda: self._pages >= pages, timeout)

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()
