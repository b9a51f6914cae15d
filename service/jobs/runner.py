"""Runs stored jobs through the scheduler, stores each page as it finishes, and resumes after a restart.

A job's pages not stored yet become one scheduler job (so they batch and interleave with every
other request's pages, round-robin); each finished page is written to the store at once and
announced to the job's event listeners. A full queue is waited out (a job is durable, not a
request that must be answered now). On shutdown the runner stops without touching the stored
state, so the next start picks the job up from its next page.

Processes sharing a store (Ray Serve replicas) each run the jobs whose lease they hold: a new job
on the replica that took the upload, an orphaned one (its process died) on whichever live runner
adopts it first. Cancellation and progress go through the store, so any replica can answer them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable

from service.engine import Cancelled, OcrOptions, PageResult
from service.errors import NotReady, Overloaded, to_service_error
from service.inputs import Document
from service.outbound import Policy
from service.scheduler import PageRequest, Scheduler

from .store import JobStore, runner_name
from .webhooks import Webhooks

log = logging.getLogger(__name__)
TERMINAL = ("done", "failed", "cancelled")
LEASE_S = 15.0  # a job whose runner stopped renewing this long ago (another host) is adopted


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        scheduler: Scheduler,
        open_upload: Callable[[bytes, tuple[int, int]], Awaitable[Document]],
        *,
        retention_s: float,
        retry_after_s: int,
        webhooks: Webhooks | None = None,
    ) -> None:
        self.store, self.scheduler, self.open_upload = store, scheduler, open_upload
        self.retention_s, self.retry_after_s = retention_s, retry_after_s
        self.webhooks = webhooks or Webhooks(enabled=False, policy=Policy())
        self._tasks: dict[str, asyncio.Task] = {}
        self._live: dict[str, PageRequest] = {}  # job id -> its pages in the scheduler
        self._listeners: dict[str, set[asyncio.Queue]] = {}
        self._stopping = False
        self._sweeper: asyncio.Task | None = None
        self.name = runner_name()

    async def start(self) -> None:
        """Once the model is ready: resume or adopt unfinished jobs, and sweep expired ones, from now on."""
        self._sweeper = asyncio.create_task(self._sweep_forever())
        await self.scheduler.loaded()
        while True:
            self.store.renew(self.name, LEASE_S)
            self.adopt_orphans()
            await asyncio.sleep(LEASE_S / 3)

    def adopt_orphans(self) -> None:
        for job_id in self.store.unfinished():
            if job_id not in self._tasks and self.store.claim(job_id, self.name, LEASE_S):
                log.info("resuming job %s", job_id)
                self._tasks[job_id] = asyncio.create_task(self._run(job_id))

    async def stop(self) -> None:
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in [*tasks, *([self._sweeper] if self._sweeper else [])]:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    def run(self, job_id: str) -> None:
        """Run a job just created here, unless another runner sharing the store adopted it already."""
        if self.store.claim(job_id, self.name, LEASE_S):
            self._tasks[job_id] = asyncio.create_task(self._run(job_id))

    def cancel(self, job_id: str) -> None:
        self.store.set_state(job_id, "cancelled")
        if job_id in self._live:
            self._live[job_id].cancel.set()
        self._announce(job_id, "state", {"state": "cancelled"})

    # --- events -----------------------------------------------------------------------------------

    def subscribe(self, job_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._listeners.setdefault(job_id, set()).add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        self._listeners.get(job_id, set()).discard(queue)

    def _announce(self, job_id: str, event: str, data: dict) -> None:
        for queue in self._listeners.get(job_id, ()):
            queue.put_nowait((event, data))

    # --- one job ------------------------------------------------------------------------------------

    async def _run(self, job_id: str) -> None:
        """Run a job this runner holds the lease of; the lease goes once its final state is stored (or
        at shutdown, so another runner may take the job at once)."""
        try:
            await self._run_held(job_id)
        finally:
            self.store.release(job_id, self.name)

    async def _run_held(self, job_id: str) -> None:
        record = self.store.get(job_id)
        if record is None or record.state in TERMINAL:
            return
        done = self.store.done_at(job_id)
        remaining = [p for p in range(len(record.numbers)) if p not in done]
        try:
            if remaining:
                await self._run_pages(job_id, record.options, record.numbers, remaining)
            state, error = "done", None
        except asyncio.CancelledError:
            raise
        except Cancelled:
            state, error = "cancelled", None
        except Exception as exc:
            if self._stopping:  # the service is going down: keep the job for the next start
                return
            failure = to_service_error(exc, retry_after_s=self.retry_after_s, request_id=f"job-{job_id}")
            state, error = "failed", failure.message
        finally:
            self._live.pop(job_id, None)
            self._tasks.pop(job_id, None)
        current = self.store.get(job_id)
        if current is None:  # expired and deleted while it ran
            return
        if current.state == "cancelled":
            state, error = "cancelled", None
        self.store.set_state(job_id, state, error)
        self._announce(job_id, "state", {"state": state, "error": error})
        if record.webhook:
            asyncio.get_running_loop().run_in_executor(None, self.webhooks.send, record.webhook, job_id, state)

    async def _run_pages(self, job_id: str, options: dict, numbers: list[int], remaining: list[int]) -> None:
        data = self.store.upload_path(job_id).read_bytes()
        document = (await self.open_upload(data, (numbers[0], numbers[-1]))).select(remaining)
        loop = asyncio.get_running_loop()

        def on_page(index: int, result: PageResult) -> None:  # the scheduler's thread
            loop.call_soon_threadsafe(self._page_done, job_id, remaining[index], result)

        self.store.set_state(job_id, "running")
        pages = PageRequest(
            document, OcrOptions(**options), time.monotonic() + self.retention_s, f"job-{job_id}", on_page=on_page
        )
        self._live[job_id] = pages
        while True:
            current = self.store.get(job_id)
            if current is None or current.state == "cancelled":
                raise Cancelled("the job was cancelled or has expired")
            try:
                self.scheduler.submit(pages)
                break
            except (Overloaded, NotReady):  # durable: wait for room instead of failing
                await asyncio.sleep(self.retry_after_s)
        finished = asyncio.wrap_future(pages.future)
        while not (await asyncio.wait({finished}, timeout=1.0))[0]:
            current = self.store.get(job_id)  # a cancel or expiry may come through another process
            if current is None or current.state == "cancelled":
                pages.cancel.set()
        await finished

    def _page_done(self, job_id: str, position: int, result: PageResult) -> None:
        stored = {"result": result.model_dump(mode="json"), "spans": result._spans, "size": result.page_size}
        done_at = self.store.save_page(job_id, position, json.dumps(stored))
        self._announce(job_id, "page", {"position": position, "done_at": done_at})  # listeners read the store

    async def _sweep_forever(self, every_s: float = 60.0) -> None:
        while True:
            for job_id in self.store.delete_older_than(time.time() - self.retention_s):
                if job_id in self._live:
                    self._live[job_id].cancel.set()
                log.info("job %s expired and was deleted", job_id)
            await asyncio.sleep(every_s)


def stored_page(text: str) -> PageResult:
    """A finished page back from the store, its stage spans included (the request statistics need them)."""
    stored = json.loads(text)
    result = PageResult.model_validate(stored["result"])
    result._spans = {stage: [tuple(span) for span in spans] for stage, spans in stored["spans"].items()}
    result._page_size = tuple(stored["size"])
    return result
