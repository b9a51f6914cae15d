"""Runs stored jobs through the scheduler, stores each page as it finishes, and resumes after a restart.

A job's pages not stored yet become one scheduler request (so they batch and interleave with every
other request's pages, round-robin); each finished page is written to the store at once and
announced to the job's event listeners. A full queue is waited out, and so is a job database that
stops answering (a job is durable, not a request that must be answered now). On shutdown the runner
stops without touching the stored state, so the next start picks the job up from its next page.

A new job runs on the replica that took the upload when that one runs fewer than ``concurrency`` jobs
(its lease is stored with the job); otherwise it waits, queued, for any replica. Every replica runs a
work loop: it takes the oldest unfinished job whose lease is free while it has room, renews its
leases, and stops a job whose lease another replica took over (it was cut off from the database too
long). A queued job wakes the loop of the replica that took it (and, on PostgreSQL, every replica's).
Cancellation, progress and events go through the store, so any replica can answer them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from service.engine import Cancelled, OcrOptions, PageResult
from service.errors import NotReady, Overloaded, StoreUnavailable
from service.failures import to_service_error
from service.inputs import Document
from service.outbound import Policy
from service.scheduler import PageRequest, Scheduler

from .store import Backlog, JobRecord, JobStore, runner_name
from .webhooks import Webhooks

log = logging.getLogger(__name__)
T = TypeVar("T")
TERMINAL = ("done", "failed", "cancelled")
LEASE_S = 15.0  # a job whose runner stopped renewing this long ago (another host) is adopted
LOOK_FOR_WORK_S = 1.0  # how often a replica looks for jobs nobody runs (a new job here wakes it at once)


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
        concurrency: int = 8,
        on_backlog: Callable[[Backlog], None] | None = None,
    ) -> None:
        self.store, self.scheduler, self.open_upload = store, scheduler, open_upload
        self.retention_s, self.retry_after_s, self.concurrency = retention_s, retry_after_s, concurrency
        self.webhooks = webhooks or Webhooks(enabled=False, policy=Policy())
        self.on_backlog = on_backlog  # the operators' view (metrics), refreshed with the leases
        self._tasks: dict[str, asyncio.Task] = {}
        self._live: dict[str, PageRequest] = {}  # job id -> its pages in the scheduler
        self._listeners: dict[str, set[asyncio.Queue]] = {}
        self._stopping = False
        self._sweeper: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.name = runner_name()

    async def start(self) -> None:
        """Once the model is ready: run unfinished jobs (this replica's, orphans, new ones) from now on,
        and sweep expired ones."""
        self._loop = asyncio.get_running_loop()
        self._sweeper = asyncio.create_task(self._sweep_forever())
        await self.scheduler.loaded()
        self.store.watch(self._heard_elsewhere)
        renew_at = 0.0
        while True:
            try:
                if time.monotonic() >= renew_at:
                    await self._renew()
                    renew_at = time.monotonic() + LEASE_S / 3
                await self._take_work()
            except StoreUnavailable as exc:  # the database is restarting or out of reach: try again later
                log.warning("jobs: %s", exc.message)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), LOOK_FOR_WORK_S)
            self._wake.clear()

    async def _take_work(self) -> None:
        while self._has_room():
            job_id = await asyncio.to_thread(self.store.claim_next, self.name, LEASE_S, set(self._tasks))
            if job_id is None:
                return
            self.run(job_id)  # (a job the route just stored with this runner's lease may come back here)

    async def _renew(self) -> None:
        if self.on_backlog is not None:
            self.on_backlog(await asyncio.to_thread(self.store.backlog))
        held = await asyncio.to_thread(self.store.renew, self.name, LEASE_S)
        for job_id in [job_id for job_id in self._tasks if job_id not in held]:
            log.warning("job %s: this replica lost its lease (cancelled, or taken over); stopping it here", job_id)
            self._stop_pages(job_id)
            self._tasks[job_id].cancel()

    async def stop(self) -> None:
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in [*tasks, *([self._sweeper] if self._sweeper else [])]:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    def holder_for_new_job(self) -> str | None:
        """This runner's name when it has room for one more job (the route stores the job with this
        runner's lease, then calls :meth:`run`), else None (the job waits, queued, for any replica)."""
        return self.name if self._has_room() else None

    def _has_room(self) -> bool:
        return len(self._tasks) < self.concurrency and not self._stopping

    def run(self, job_id: str) -> None:
        """Run a job stored with this runner's lease, unless it runs here already."""
        if job_id in self._tasks:
            return
        log.info("running job %s", job_id)
        self._tasks[job_id] = asyncio.create_task(self._run(job_id))

    def wake(self) -> None:
        """A job was queued here: look for work now rather than at the next round."""
        self._wake.set()

    async def cancel(self, job_id: str) -> None:
        await asyncio.to_thread(self.store.set_state, job_id, "cancelled")
        self._stop_pages(job_id)
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

    def _heard_elsewhere(self, job_id: str, event: str, data: dict) -> None:
        """News from any replica (the store's listener thread): wake the work loop on a new job, stop a
        job cancelled through another replica at once, and pass it on to this replica's streams."""
        with contextlib.suppress(RuntimeError):  # the loop closed: the service is going down
            self._loop.call_soon_threadsafe(self._heard, job_id, event, data)

    def _heard(self, job_id: str, event: str, data: dict) -> None:
        if event == "created":
            self._wake.set()
        if event == "state" and data.get("state") == "cancelled":
            self._stop_pages(job_id)
        self._announce(job_id, event, data)

    def _stop_pages(self, job_id: str) -> None:
        """Cancel the job's pages in this replica's scheduler, if they are there."""
        if job_id in self._live:
            self._live[job_id].cancel.set()

    # --- one job ------------------------------------------------------------------------------------

    async def _persist(self, method: Callable[..., T], *args) -> T:
        """A store call the job cannot go on without: waits out a database outage (until shutdown)."""
        while True:
            try:
                return await asyncio.to_thread(method, *args)
            except StoreUnavailable:
                if self._stopping:
                    raise
                await asyncio.sleep(self.retry_after_s)

    async def _run(self, job_id: str) -> None:
        """Run a job this runner holds the lease of; the lease goes once its final state is stored (or
        at shutdown, so another runner may take the job at once)."""
        finished = False
        try:
            finished = await self._run_held(job_id)
        finally:
            self._tasks.pop(job_id, None)
            self._wake.set()  # room for another job
            if not finished:  # a final state freed the lease already
                with contextlib.suppress(StoreUnavailable):  # unreleased, the lease runs out by itself
                    await asyncio.to_thread(self.store.release, job_id, self.name)

    async def _run_held(self, job_id: str) -> bool:
        """Run the job's remaining pages; True when its final state is stored."""
        try:
            record = await self._persist(self.store.get, job_id)
            if record is None or record.state in TERMINAL:
                return False
            done = await self._persist(self.store.done_at, job_id)
        except StoreUnavailable:  # only while stopping
            return False
        remaining = [p for p in range(len(record.numbers)) if p not in done]
        try:
            if remaining:
                await self._run_pages(record, remaining)
            state, error = "done", None
        except asyncio.CancelledError:
            raise
        except Cancelled:
            state, error = "cancelled", None
        except Exception as exc:
            if self._stopping:  # the service is going down: keep the job for the next start
                return False
            failure = to_service_error(exc, retry_after_s=self.retry_after_s, request_id=f"job-{job_id}")
            state, error = "failed", failure.message
        finally:
            self._live.pop(job_id, None)
        return await self._finish(record, state, error)

    async def _finish(self, record: JobRecord, state: str, error: str | None) -> bool:
        try:
            current = await self._persist(self.store.get, record.id)
            if current is None:  # expired and deleted while it ran
                return False
            if current.state == "cancelled":
                state, error = "cancelled", None
            elif state == "done" and len(await self._persist(self.store.done_at, record.id)) < len(record.numbers):
                log.warning("job %s: a page was not stored; the job stays unfinished and resumes", record.id)
                return False
            await self._persist(self.store.set_state, record.id, state, error)
        except StoreUnavailable:  # only while stopping: the next start finishes it
            return False
        self._announce(record.id, "state", {"state": state, "error": error})
        if record.webhook:
            self.webhooks.deliver(record.webhook, record.id, state)
        return True

    async def _run_pages(self, record: JobRecord, remaining: list[int]) -> None:
        job_id, numbers = record.id, record.numbers
        data = await self._persist(self.store.upload, job_id)
        document = (await self.open_upload(data, (numbers[0], numbers[-1]))).select(remaining)
        loop = asyncio.get_running_loop()
        saving: set[asyncio.Task] = set()

        def on_page(index: int, result: PageResult) -> None:  # the scheduler's thread
            loop.call_soon_threadsafe(self._page_done, job_id, remaining[index], result, saving)

        pages = PageRequest(
            document,
            OcrOptions(**record.page_options),
            time.monotonic() + self.retention_s,
            f"job-{job_id}",
            on_page=on_page,
            client=f"owner:{record.owner}",  # a job's pages take turns with other owners' jobs
            priority=record.priority,
        )
        self._live[job_id] = pages
        while True:
            if await self._cancelled_elsewhere(job_id):
                raise Cancelled("the job was cancelled or has expired")
            try:
                self.scheduler.submit(pages)
                break
            except (Overloaded, NotReady):  # durable: wait for room instead of failing
                await asyncio.sleep(self.retry_after_s)
        finished = asyncio.wrap_future(pages.future)
        # when this task is cancelled while it waits (shutdown; a lease lost after a DELETE), the pages end
        # with an exception nobody awaits any more: retrieved here, so asyncio logs no "never retrieved"
        finished.add_done_callback(lambda f: f.cancelled() or f.exception())
        while not (await asyncio.wait({finished}, timeout=1.0))[0]:
            if await self._cancelled_elsewhere(job_id):  # a cancel or expiry through another replica
                pages.cancel.set()
        try:
            await finished
        finally:  # the pages finished before the end are stored before the job's state is
            await asyncio.gather(*saving, return_exceptions=True)

    async def _cancelled_elsewhere(self, job_id: str) -> bool:
        try:
            current = await asyncio.to_thread(self.store.get, job_id)
        except StoreUnavailable:
            return False
        return current is None or current.state == "cancelled"

    def _page_done(self, job_id: str, position: int, result: PageResult, saving: set[asyncio.Task]) -> None:
        stored = {"result": result.model_dump(mode="json"), "spans": result._spans, "size": result.page_size}
        task = asyncio.create_task(self._store_page(job_id, position, json.dumps(stored)))
        saving.add(task)
        task.add_done_callback(saving.discard)

    async def _store_page(self, job_id: str, position: int, stored: str) -> None:
        done_at = await self._persist(self.store.save_page, job_id, position, stored)
        self._announce(job_id, "page", {"position": position, "done_at": done_at})  # listeners read the store

    async def _sweep_forever(self, every_s: float = 60.0) -> None:
        while True:
            try:
                deleted = await asyncio.to_thread(self.store.delete_older_than, time.time() - self.retention_s)
            except StoreUnavailable as exc:
                log.warning("jobs: expiry skipped this round: %s", exc.message)
                deleted = []
            for job_id in deleted:
                self._stop_pages(job_id)
                log.info("job %s expired and was deleted", job_id)
            await asyncio.sleep(every_s)


def stored_page(text: str) -> PageResult:
    """A finished page back from the store, its stage spans included (the request statistics need them)."""
    stored = json.loads(text)
    result = PageResult.model_validate(stored["result"])
    result._spans = {stage: [tuple(span) for span in spans] for stage, spans in stored["spans"].items()}
    result._page_size = tuple(stored["size"])
    return result
