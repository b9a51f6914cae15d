"""Asynchronous jobs for long documents: ``POST /v1/jobs`` (the form of ``/v1/ocr``) answers 202 at once;
poll ``GET /v1/jobs/{id}``, stream page events from ``/events``, fetch ``/result``, ``DELETE`` to cancel.

Jobs are durable (see :mod:`service.jobs`) and belong to the API key that made them: another
key's job is a 404, like a job that does not exist.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Form, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from service.api.deps import RunnerDep, SchedulerDep, SettingsDep
from service.api.doors import ERROR_RESPONSES, OcrForm, build_response, event_stream, open_door, read_upload
from service.api.middleware import key_digest
from service.api.responses import JSONResponse
from service.api.shares import ClientShares
from service.engine import OcrOptions
from service.errors import (
    InvalidParameter,
    JobCancelled,
    JobFailed,
    NotFinished,
    NotFound,
    Overloaded,
    StorageShareUsed,
    TooManyJobs,
)
from service.jobs import JobRecord, JobRunner, JobStore, stored_page
from service.jobs.runner import LEASE_S
from service.jobs.store import PRIORITY_KEY, WARNINGS_KEY
from service.outbound import OutboundRefused, resolve
from service.settings import ServiceSettings

router = APIRouter(tags=["jobs"])


class JobForm(OcrForm):
    webhook_url: str | None = Field(
        None,
        max_length=2048,
        pattern=r"^https?://",
        description="POSTed {id, state} when the job ends (if the server allows it)",
    )
    priority: Literal["batch", "interactive"] = Field(
        "batch",
        description="batch: the job's pages take the turns interactive requests leave; interactive: its pages go "
        "with interactive requests (jobs of at most RTPRUNE_INTERACTIVE_JOB_PAGES pages)",
    )


class PageProgress(BaseModel):
    page: int
    done_at: float | None


class JobStatus(BaseModel):
    id: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    pages_total: int
    pages_done: int
    created: float
    updated: float
    error: str | None
    pages: list[PageProgress]
    warnings: list[str] = Field(
        default_factory=list, description="notes on the chosen options, from creation to expiry"
    )


def check_webhook(url: str, settings: ServiceSettings) -> None:
    """422 unless the webhook's host resolves to addresses the outbound policy allows (public ones, or a
    network of RTPRUNE_OUTBOUND_ALLOW_NETWORKS): a webhook must not reach into the service's network."""
    try:
        resolve(url, settings.outbound_policy())
    except OutboundRefused:
        raise InvalidParameter(
            "webhook_url must name a public address (or one in RTPRUNE_OUTBOUND_ALLOW_NETWORKS)"
        ) from None


def owner_of(request: Request) -> str:
    """Who a job belongs to: a digest of the caller's API key (everyone shares one without keys)."""
    return key_digest(request.headers) or "anonymous"


async def find(store: JobStore, job_id: str, request: Request) -> JobRecord:
    record = await run_in_threadpool(store.get, job_id, owner_of(request))
    if record is None:
        shown = job_id if len(job_id) <= 64 else job_id[:64] + "..."  # an id is 32 characters: no echo of more
        raise NotFound(f"no job {shown!r} (or it belongs to another key, or it expired)")
    return record


async def status_of(record: JobRecord, store: JobStore) -> JobStatus:
    done = await run_in_threadpool(store.done_at, record.id)
    return JobStatus(
        id=record.id,
        state=record.state,
        pages_total=len(record.numbers),
        pages_done=len(done),
        created=record.created,
        updated=record.updated,
        error=record.error,
        pages=[PageProgress(page=n, done_at=done.get(p)) for p, n in enumerate(record.numbers)],
        warnings=record.warnings,
    )


async def check_storage(store: JobStore, client: str, size: int, settings: ServiceSettings) -> None:
    """Room for ``size`` more bytes of uploads: in this client's share of the job storage (429: one client
    cannot fill it for everyone), and in all (503)."""
    retry = {"Retry-After": str(settings.retry_after_s)}
    share = int(settings.jobs_max_bytes * settings.jobs_client_share)
    if share < settings.jobs_max_bytes and await run_in_threadpool(store.total_bytes, client) + size > share:
        raise StorageShareUsed(
            f"this client's jobs hold their share of the job storage ({share:,} bytes of uploads); wait for one to "
            "end, or delete a finished one (DELETE frees its upload at once)",
            headers=retry,
        )
    if await run_in_threadpool(store.total_bytes) + size > settings.jobs_max_bytes:
        raise Overloaded("job storage is full; retry later", headers=retry)


@router.post(
    "/v1/jobs",
    status_code=202,
    summary="Start an OCR job (the form of /v1/ocr); 202 at once",
    responses=ERROR_RESPONSES,
)
async def create_job(
    request: Request,
    form: Annotated[JobForm, Form()],
    scheduler: SchedulerDep,
    runner: RunnerDep,
    settings: SettingsDep,
) -> JSONResponse:
    door = open_door(scheduler, form.chosen(), settings)
    if form.webhook_url and not settings.allow_webhooks:
        raise InvalidParameter("webhooks are off on this server (RTPRUNE_ALLOW_WEBHOOKS)")
    if form.webhook_url:
        await run_in_threadpool(check_webhook, form.webhook_url, settings)
    data, document = await read_upload(request, form, settings, form.page_range())  # every limit, before storing
    if form.priority == "interactive" and len(document) > settings.interactive_job_pages:
        raise InvalidParameter(
            f"a job with priority=interactive may have at most {settings.interactive_job_pages} pages, this one has "
            f"{len(document)}; send it as a batch job, or in parts",
            param="priority",
        )
    owner, store = owner_of(request), runner.store
    if await run_in_threadpool(store.count_unfinished, owner) >= settings.jobs_per_key:
        raise TooManyJobs(
            f"this key has {settings.jobs_per_key} unfinished jobs; wait for one to finish, or cancel one (DELETE)"
        )
    client = ClientShares.client_of(request.scope)  # its address: the key is shared, or the client's choice
    await check_storage(store, client, len(data), settings)
    options_json = {**door.options.model_dump(mode="json"), WARNINGS_KEY: door.notes, PRIORITY_KEY: form.priority}
    holder = runner.holder_for_new_job()
    record = await run_in_threadpool(
        store.create, owner, options_json, document.numbers, data, form.webhook_url, holder, LEASE_S, client
    )
    if holder is not None:
        runner.run(record.id)
    else:
        runner.wake()
    body = (await status_of(record, store)).model_dump(mode="json")
    location = str(request.url_for("job_status", job_id=record.id))  # absolute, as RFC 9110 prefers
    return JSONResponse(body, status_code=202, headers={"Location": location})


@router.get("/v1/jobs/{job_id}", summary="A job's state and progress in pages", responses=ERROR_RESPONSES)
async def job_status(job_id: str, request: Request, runner: RunnerDep) -> JobStatus:
    return await status_of(await find(runner.store, job_id, request), runner.store)


@router.get(
    "/v1/jobs/{job_id}/result", summary="A finished job's result (as /v1/ocr answers)", responses=ERROR_RESPONSES
)
async def job_result(
    job_id: str,
    request: Request,
    runner: RunnerDep,
    settings: SettingsDep,
    scheduler: SchedulerDep,
):
    record = await find(runner.store, job_id, request)
    if record.state == "cancelled":
        raise JobCancelled("the job was cancelled; it has no result (its status lists the pages it finished)")
    if record.state == "failed":
        raise JobFailed(f"the job failed: {record.error or 'no reason was recorded'}")
    if record.state != "done":
        raise NotFinished(f"the job is {record.state}; its result is ready when the state is done")
    done = await run_in_threadpool(runner.store.pages, job_id)
    results = [stored_page(done[p][0]) for p in range(len(record.numbers))]
    return build_response(
        settings.model,
        scheduler.random_weights,
        OcrOptions(**record.page_options),
        record.numbers,
        results,
        record.warnings,
        (record.updated - record.created) * 1e3,
    )


@router.delete(
    "/v1/jobs/{job_id}", summary="Cancel a job (finished pages stay until it expires)", responses=ERROR_RESPONSES
)
async def cancel_job(job_id: str, request: Request, runner: RunnerDep) -> JobStatus:
    record = await find(runner.store, job_id, request)
    if record.state not in ("done", "failed", "cancelled"):
        await runner.cancel(job_id)
    return await status_of(await find(runner.store, job_id, request), runner.store)


@router.get(
    "/v1/jobs/{job_id}/events",
    summary="Server-sent events: one per finished page, then the final state",
    responses=ERROR_RESPONSES,
)
async def job_events(job_id: str, request: Request, runner: RunnerDep):
    record = await find(runner.store, job_id, request)
    settings = request.app.state.settings
    after = resume_point(request.headers.get("last-event-id"))
    stream = events(runner, record, request, settings.stream_idle_s, settings.sse_keepalive_s, after)
    return event_stream(request, stream)[0]


def resume_point(last_event_id: str | None) -> int:
    """How many page events a reconnecting client has seen: its ``Last-Event-ID`` (0 without one)."""
    try:
        return max(0, int(last_event_id or 0))
    except ValueError:
        raise InvalidParameter("Last-Event-ID must be the id of an event this stream sent (a number)") from None


async def events(
    runner: JobRunner, record: JobRecord, request: Request, idle_s: float, keepalive_s: float, after: int = 0
) -> AsyncIterator[str]:
    """Page events as pages finish, then the final state. Page events are numbered in the order the pages
    finished (``id: 1``, ``2``, ...), so a client that reconnects with ``Last-Event-ID: n`` gets the pages
    after its n-th; the end event has no id (a reconnect after it replays it). While a page runs the stream
    sends a ``: keep-alive`` comment every ``keepalive_s`` (proxies cut silent streams); one with no news
    for ``idle_s`` ends with an ``idle`` event (reconnect to go on).

    News of any replica wakes the stream: this replica's runner announces its own pages, and on
    PostgreSQL every replica's changes arrive through the store's listener; besides, the store is read
    every ``store.poll_s`` (SQLite's only way to see another process's pages)."""
    store = runner.store
    queue = runner.subscribe(record.id)  # first, so nothing between the snapshot and now is missed
    seen: set[int] = set()  # pages numbered so far, those the client had seen included
    last_news = last_sent = time.monotonic()

    async def stored_pages() -> list[str]:  # pages finished by any replica, in the order they did
        finished = await run_in_threadpool(store.done_at, record.id)
        done = sorted((at, p) for p, at in finished.items() if p not in seen)
        out = []
        for at, p in done:
            seen.add(p)
            if len(seen) > after:
                out.append(sse("page", {"page": record.numbers[p], "done_at": at}, event_id=len(seen)))
        return out

    try:
        state = record.state
        while True:
            for event in await stored_pages():
                last_news = last_sent = time.monotonic()
                yield event
            if state not in ("queued", "running"):
                break
            now = time.monotonic()
            if now - last_news > idle_s:
                yield sse("idle", {"after_s": idle_s, "state": state})
                return
            if now - last_sent >= keepalive_s:
                last_sent = now
                yield ": keep-alive\n\n"
            try:
                kind, data = await asyncio.wait_for(queue.get(), min(store.poll_s, keepalive_s))
                if kind == "state":
                    state = data["state"]
            except TimeoutError:
                if await request.is_disconnected():
                    return
                state = (await run_in_threadpool(store.get, record.id) or record).state
        final = await run_in_threadpool(store.get, record.id) or record
        yield sse("end", {"state": final.state, "error": final.error, "at": time.time()})
    finally:
        runner.unsubscribe(record.id, queue)


def sse(event: str, data: dict, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"
