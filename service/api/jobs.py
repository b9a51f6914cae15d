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

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from service.api.common import ERROR_RESPONSES, OcrForm, build_response, door_options, event_stream, read_upload
from service.api.deps import get_scheduler, get_settings
from service.api.middleware import key_digest
from service.engine import OcrOptions
from service.errors import InvalidParameter, NotFinished, NotFound, Overloaded, TooManyJobs
from service.jobs import JobRecord, JobRunner, JobStore, stored_page
from service.outbound import OutboundRefused, resolve
from service.scheduler import Scheduler
from service.settings import ServiceSettings

router = APIRouter(tags=["jobs"])


class JobForm(OcrForm):
    webhook_url: str | None = Field(
        None, pattern=r"^https?://", description="POSTed {id, state} when the job ends (if the server allows it)"
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
    warnings: list[str] = Field(default_factory=list, description="on creation: notes on the chosen options")


def check_webhook(url: str, settings: ServiceSettings) -> None:
    """422 unless the webhook's host resolves to addresses the outbound policy allows (public ones, or a
    network of RTPRUNE_OUTBOUND_ALLOW_NETWORKS): a webhook must not reach into the service's network."""
    try:
        resolve(url, settings.outbound_policy())
    except OutboundRefused:
        raise InvalidParameter(
            "webhook_url must name a public address (or one in RTPRUNE_OUTBOUND_ALLOW_NETWORKS)"
        ) from None


def get_runner(request: Request) -> JobRunner:
    return request.app.state.jobs


def owner_of(request: Request) -> str:
    """Who a job belongs to: a digest of the caller's API key (everyone shares one without keys)."""
    return key_digest(request.headers) or "anonymous"


def find(store: JobStore, job_id: str, request: Request) -> JobRecord:
    record = store.get(job_id, owner=owner_of(request))
    if record is None:
        raise NotFound(f"no job {job_id!r} (or it belongs to another key, or it expired)")
    return record


def status_of(record: JobRecord, store: JobStore) -> JobStatus:
    done = store.done_at(record.id)
    return JobStatus(
        id=record.id,
        state=record.state,
        pages_total=len(record.numbers),
        pages_done=len(done),
        created=record.created,
        updated=record.updated,
        error=record.error,
        pages=[PageProgress(page=n, done_at=done.get(p)) for p, n in enumerate(record.numbers)],
    )


@router.post(
    "/v1/jobs",
    status_code=202,
    summary="Start an OCR job (the form of /v1/ocr); 202 at once",
    responses=ERROR_RESPONSES,
)
async def create_job(
    request: Request,
    form: Annotated[JobForm, Form()],
    scheduler: Annotated[Scheduler, Depends(get_scheduler)],
    runner: Annotated[JobRunner, Depends(get_runner)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
) -> JSONResponse:
    options, notes = door_options(scheduler.ensure_ready(), form.chosen())
    if form.webhook_url and not settings.allow_webhooks:
        raise InvalidParameter("webhooks are off on this server (RTPRUNE_ALLOW_WEBHOOKS)")
    if form.webhook_url:
        await run_in_threadpool(check_webhook, form.webhook_url, settings)
    data, document = await read_upload(request, form, settings, form.page_range())  # every limit, before storing
    owner, store = owner_of(request), runner.store
    if store.count_unfinished(owner) >= settings.jobs_per_key:
        raise TooManyJobs(
            f"this key has {settings.jobs_per_key} unfinished jobs; wait for one to finish, or cancel one (DELETE)"
        )
    if store.total_bytes() + len(data) > settings.jobs_max_bytes:
        raise Overloaded("job storage is full; retry later", headers={"Retry-After": str(settings.retry_after_s)})
    record = store.create(owner, options.model_dump(mode="json"), document.numbers, data, form.webhook_url)
    runner.run(record.id)
    body = status_of(record, store).model_copy(update={"warnings": notes}).model_dump(mode="json")
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{record.id}"})


@router.get("/v1/jobs/{job_id}", summary="A job's state and progress in pages", responses=ERROR_RESPONSES)
async def job_status(job_id: str, request: Request, runner: Annotated[JobRunner, Depends(get_runner)]) -> JobStatus:
    return status_of(find(runner.store, job_id, request), runner.store)


@router.get(
    "/v1/jobs/{job_id}/result", summary="A finished job's result (as /v1/ocr answers)", responses=ERROR_RESPONSES
)
async def job_result(
    job_id: str,
    request: Request,
    runner: Annotated[JobRunner, Depends(get_runner)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
    scheduler: Annotated[Scheduler, Depends(get_scheduler)],
):
    record = find(runner.store, job_id, request)
    if record.state != "done":
        detail = f": {record.error}" if record.error else ""
        raise NotFinished(f"the job is {record.state}{detail}")
    done = runner.store.pages(job_id)
    results = [stored_page(done[p][0]) for p in range(len(record.numbers))]
    random_weights = bool(scheduler.engine and scheduler.engine.random_weights)
    return build_response(
        settings.model,
        random_weights,
        OcrOptions(**record.options),
        record.numbers,
        results,
        [],
        (record.updated - record.created) * 1e3,
    )


@router.delete(
    "/v1/jobs/{job_id}", summary="Cancel a job (finished pages stay until it expires)", responses=ERROR_RESPONSES
)
async def cancel_job(job_id: str, request: Request, runner: Annotated[JobRunner, Depends(get_runner)]) -> JobStatus:
    record = find(runner.store, job_id, request)
    if record.state not in ("done", "failed", "cancelled"):
        runner.cancel(job_id)
    return status_of(runner.store.get(job_id), runner.store)


@router.get(
    "/v1/jobs/{job_id}/events",
    summary="Server-sent events: one per finished page, then the final state",
    responses=ERROR_RESPONSES,
)
async def job_events(job_id: str, request: Request, runner: Annotated[JobRunner, Depends(get_runner)]):
    record = find(runner.store, job_id, request)
    idle_s = request.app.state.settings.stream_idle_s
    return event_stream(request, events(runner, record, request, idle_s))[0]


async def events(runner: JobRunner, record: JobRecord, request: Request, idle_s: float) -> AsyncIterator[str]:
    """Page events as pages finish, then the final state; a stream with nothing to say for ``idle_s`` ends
    with an ``idle`` event (reconnect to go on: the stream starts again from the stored pages)."""
    queue = runner.subscribe(record.id)  # first, so nothing between the snapshot and now is missed
    sent: set[int] = set()
    last_news = time.monotonic()

    def stored_pages() -> list[str]:  # pages finished by any process sharing the store
        done = sorted((p, at) for p, at in runner.store.done_at(record.id).items() if p not in sent)
        sent.update(p for p, _ in done)
        return [sse("page", {"page": record.numbers[p], "done_at": at}) for p, at in done]

    try:
        state = runner.store.get(record.id).state
        while True:
            for event in stored_pages():
                last_news = time.monotonic()
                yield event
            if state not in ("queued", "running"):
                break
            if time.monotonic() - last_news > idle_s:
                yield sse("idle", {"after_s": idle_s, "state": state})
                return
            try:  # this process's runner announces pages and the end; the store has them all
                kind, data = await asyncio.wait_for(queue.get(), 1.0)
                if kind == "state":
                    state = data["state"]
            except TimeoutError:  # this process may not be the one running the job: look at the store
                if await request.is_disconnected():
                    return
                state = runner.store.get(record.id).state
        final = runner.store.get(record.id)
        yield sse("end", {"state": final.state, "error": final.error, "at": time.time()})
    finally:
        runner.unsubscribe(record.id, queue)


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
