"""Converting in this process: the model loaded once, every page of every document through the
service's own scheduler, so pages of different documents batch together (continuous batching,
page-level admission and the KV budget, exactly as the HTTP service runs them)."""

from __future__ import annotations

import dataclasses
import queue
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass

from service.engine import OcrOptions, PageResult
from service.failures import to_service_error
from service.inputs import Document
from service.scheduler import PageRequest, Scheduler, SchedulerConfig

FOREVER_S = 365 * 24 * 3600.0  # a conversion has no deadline; a page ends at its own limits


@dataclass(eq=False)
class Work:
    """A document's pages still to do, and what to do as each finishes (called on the caller's thread)."""

    name: str
    document: Document  # only the pages still to do
    options: OcrOptions
    on_page: Callable[[int, PageResult], None]  # (page number, result)
    on_end: Callable[[Exception | None], None]  # None: every page finished; else why the document failed


class LocalRunner:
    """Feeds documents to one scheduler with at most half its queue waiting at a time (a long document
    goes in parts, so it never holds the whole queue), and hands finished pages back to the caller."""

    def __init__(self, engine, config: SchedulerConfig) -> None:
        # a conversion's pages are batch work with no interactive page beside them: no row is kept for one
        self.scheduler = Scheduler(lambda: engine, dataclasses.replace(config, interactive_rows=0))
        self.scheduler.start()
        while self.scheduler.state == "loading":
            time.sleep(0.02)
        self.scheduler.ensure_ready()
        self._finished: queue.Queue = queue.Queue()

    def run(self, works: list[Work]) -> None:
        capacity = max(1, self.scheduler.queue_capacity // 2)
        parts = deque((work, chunk) for work in works for chunk in _chunks(len(work.document), capacity))
        parts_left = Counter(work for work, _ in parts)
        failed: set[Work] = set()
        in_flight: dict[Future, tuple[Work, PageRequest]] = {}
        while parts or in_flight:
            while parts and sum(r.pages for _, r in in_flight.values()) + len(parts[0][1]) <= capacity:
                work, chunk = parts.popleft()
                if work in failed:
                    parts_left[work] -= 1
                    continue
                request = self._request(work, chunk)
                self.scheduler.submit(request)
                in_flight[request.future] = (work, request)
            done, _ = wait(list(in_flight), timeout=0.2, return_when=FIRST_COMPLETED)
            self._hand_back()
            for future in done:
                work, _ = in_flight.pop(future)
                parts_left[work] -= 1
                if work in failed:
                    continue
                if future.exception() is not None:
                    failed.add(work)
                    for other, request in in_flight.values():
                        if other is work:
                            request.cancel.set()
                    work.on_end(to_service_error(future.exception(), retry_after_s=0))
                elif parts_left[work] == 0:
                    work.on_end(None)
        self._hand_back()

    def _request(self, work: Work, chunk: list[int]) -> PageRequest:
        document = work.document.select(chunk)

        def on_page(index: int, result: PageResult) -> None:  # the scheduler's thread: hand over only
            self._finished.put((work, document.numbers[index], result))

        deadline = time.monotonic() + FOREVER_S
        name = f"convert:{work.name}"
        return PageRequest(document, work.options, deadline, name, on_page=on_page, priority="batch")

    def _hand_back(self) -> None:
        while True:
            try:
                work, number, result = self._finished.get_nowait()
            except queue.Empty:
                return
            work.on_page(number, result)

    def stop(self) -> None:
        self.scheduler.stop(timeout=60)


def _chunks(count: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, count))) for start in range(0, count, size)]
