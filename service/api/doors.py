"""What every front door shares: the form, the one options call, reading an upload, waiting for the
scheduler, and the /v1/ocr answer. Routes import this module (and ``deps``), never each other.

A door only translates its dialect into the fields a caller chose (a dict) and back into its
answer; everything between is the same call for all of them:
:func:`open_door` (the model ready, :func:`door_options`) -> :func:`open_upload` -> :func:`page_request` ->
``scheduler.submit`` ->
:func:`wait_for`, whose failures go through the one error table (:func:`service.failures.to_service_error`).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Request, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from service.api import data_urls
from service.api.shares import ClientShares
from service.engine import RANDOM_WEIGHTS_WARNING, OCREngine, OcrOptions, PageResult
from service.engine.options import in_one_sentence
from service.errors import (
    ClientGone,
    DeadlineExceeded,
    ErrorResponse,
    InvalidParameter,
    validation_message,
)
from service.failures import to_service_error
from service.inputs import (
    PAGE_RANGE,
    PAGE_RANGE_HELP,
    Document,
    PageRange,
    bytes_of_url,
    open_document,
    parse_page_range,
)
from service.scheduler import PageRequest, Scheduler
from service.schemas import PAGE_SEPARATOR, OcrResponse, PageOut, aggregate
from service.settings import ServiceSettings

DISCONNECT_POLL_S = 0.1

ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "the body is not valid JSON (JSON routes); an invalid parameter (OpenAI-compatible routes)",
        401: "missing or wrong API key (Authorization: Bearer, or X-API-Key)",
        404: "no such job, or another key's (job routes)",
        408: "the upload stalled (no bytes for RTPRUNE_BODY_TIMEOUT_S)",
        409: "the job is not finished, was cancelled or failed (its result)",
        413: "upload, image, PDF or JSON over a limit",
        415: "unsupported file type",
        422: "invalid parameter or corrupt file (400 on the OpenAI-compatible routes, as OpenAI answers)",
        429: "too many unfinished jobs, open streams or requests in flight for this client",
        499: "client closed the request",
        500: "internal error",
        503: "not ready, queue full, shutting down or out of memory (Retry-After)",
        504: "deadline exceeded",
    }.items()
}


PageRangeText = Annotated[
    str,
    Field(pattern=PAGE_RANGE.pattern),
    in_one_sentence(lambda value: f"pages must be {PAGE_RANGE_HELP}; got {str(value)[:40]}"),
]


class OcrForm(OcrOptions):
    """The multipart form of /v1/ocr and /v1/jobs: the file plus every per-request option of the engine."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file: UploadFile = Field(
        description="PNG, JPEG, WebP, TIFF, BMP, GIF, or PDF (one file part)", json_schema_extra={"format": "binary"}
    )
    pages: PageRangeText | None = Field(None, description=f"PDF pages: {PAGE_RANGE_HELP}; default all")

    def chosen(self) -> dict[str, Any]:
        """The engine options the caller set (the form's other fields, of subclasses too, left out)."""
        return self.model_dump(include=set(OcrOptions.model_fields), exclude_unset=True)

    def page_range(self) -> PageRange | None:
        return parse_page_range(self.pages) if self.pages is not None else None


@dataclass(frozen=True)
class Door:
    """What a door learns from the engine before it reads a byte of the upload: the options the pages run
    with, the notes its answer carries, and how the engine's tokens read. Routes hold this, never the engine."""

    options: OcrOptions
    notes: list[str]
    random_weights: bool
    detokenizer: Callable[[bool], Callable[[list[int]], str]]  # skip_special_tokens -> ids -> text


def open_door(scheduler: Scheduler, chosen: dict[str, Any], settings: ServiceSettings) -> Door:
    """The first step of every door: the model ready (else 503 NotReady) and the caller's options resolved
    (:func:`door_options`; 422 for anything that cannot run)."""
    engine = scheduler.ensure_ready()
    options, notes = door_options(engine, chosen, settings)
    return Door(options, notes, engine.random_weights, engine.detokenizer)


def door_options(engine: OCREngine, chosen: dict[str, Any], settings: ServiceSettings) -> tuple[OcrOptions, list[str]]:
    """The one options call of every door: the caller's fields with this engine's defaults, validated in
    one order (:meth:`OCREngine.resolve_options`), and the notes on chosen fields without effect (or
    capped: a random preset's token budget). InvalidParameter (422) in one sentence for anything that
    cannot run."""
    try:
        return engine.resolve_options(chosen, random_cap=settings.random_max_new_tokens)
    except ValidationError as exc:
        raise InvalidParameter(validation_message(exc.errors())) from None
    except ValueError as exc:
        raise InvalidParameter(str(exc)) from None


async def read_upload(
    request: Request, form: OcrForm, settings: ServiceSettings, page_range: PageRange | None
) -> tuple[bytes, Document]:
    """The form's upload as bytes and a Document, every limit checked before any PDF page is rendered."""
    if len((await request.form()).getlist("file")) > 1:  # parsed once by FastAPI; this is its cache
        raise InvalidParameter("send one `file` part per request; this one has several")
    data = await form.file.read()
    return data, await open_upload(data, settings, page_range)


async def read_url(request: Request, url: str, settings: ServiceSettings) -> bytes:
    """The bytes of a JSON door's data URL (or allowed http(s) URL), off the event loop and off the threads
    that read uploads: fetches have their own small pool, so slow servers cannot stall uploads."""
    lifted = data_urls.take(request.scope, url)  # decoded from the body's bytes as it arrived
    if lifted is not None:
        return lifted
    limits = (settings.max_upload_bytes, settings.allow_url_fetch, settings.fetch_timeout_s)
    call = functools.partial(bytes_of_url, url, *limits, settings.outbound_policy())
    loop = asyncio.get_running_loop()
    if url.startswith("data:"):  # decoded on the common threads: it must not wait behind slow remote fetches
        return await loop.run_in_executor(None, call)
    shares = request.app.state.fetches  # 429 past this client's share of the fetch threads
    client = shares.acquire(request.scope)
    try:
        return await loop.run_in_executor(request.app.state.fetch_pool, call)
    finally:
        shares.release(client)


async def open_upload(
    data: bytes,
    settings: ServiceSettings,
    page_range: PageRange | None = None,
    selection: list[tuple[int, int]] | None = None,
) -> Document:
    """Bytes of any door (form, data URL, stored job) -> Document, under the service's limits (which only
    the pages of ``page_range`` or ``selection``, 1-based inclusive ranges, count against)."""
    return await run_in_threadpool(
        open_document,
        data,
        max_pixels=settings.max_image_pixels,
        max_pdf_pages=settings.max_pdf_pages,
        max_document_pixels=settings.max_document_pixels,
        page_range=page_range,
        selection=selection,
    )


def page_request(
    request: Request, document: Document, options: OcrOptions, settings: ServiceSettings, accepted_at: float
) -> PageRequest:
    """The scheduler's request for an HTTP request that waits for its answer: its deadline and id."""
    deadline = accepted_at + settings.request_timeout_s
    client = ClientShares.client_of(request.scope)  # turns in the page queue are fair by client
    return PageRequest(document, options, deadline, request.state.request_id, accepted_at, client=client)


async def wait_for(request: Request, pages: PageRequest, settings: ServiceSettings) -> list[PageResult]:
    """Await the scheduler's result; cancel the work if the client leaves or the deadline passes.
    Failures leave through the one error table."""
    future = asyncio.wrap_future(pages.future)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if time.monotonic() > pages.deadline:
                raise DeadlineExceeded("the request ran past its deadline; its work was cancelled")
            if await request.is_disconnected():
                raise ClientGone("the client closed the connection; its work was cancelled")
        try:
            return future.result()
        except Exception as exc:
            raise failure(exc, pages, settings) from None
    finally:
        pages.cancel.set()  # no-op when finished; stops the scheduler's work otherwise
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # never an unretrieved exception


def failure(exc: BaseException, pages: PageRequest, settings: ServiceSettings) -> Exception:
    """What ``exc``, raised for ``pages``, means for the client (the error table, with the request's facts)."""
    return to_service_error(
        exc,
        retry_after_s=settings.retry_after_s,
        deadline_passed=time.monotonic() > pages.deadline,
        request_id=pages.request_id,
    )


class StreamLease:
    """One stream's place under the stream limits, given back once (when the stream ends, or if it never
    starts)."""

    def __init__(self, request: Request) -> None:
        self._streams = request.app.state.streams
        self._client: str | None = self._streams.acquire(request.scope)  # 429 or 503 when there is no room

    def release(self) -> None:
        if self._client is not None:
            self._streams.release(self._client)
            self._client = None


def event_stream(request: Request, events: AsyncIterator[str]) -> tuple[StreamingResponse, StreamLease]:
    """A server-sent event stream under the stream limits (:class:`~service.api.shares.StreamLimits`),
    counted from now until it ends, however it ends; 429 or 503 at once if there is no room. The lease is
    the caller's to release if it never sends the response."""
    lease = StreamLease(request)

    async def counted() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        finally:
            lease.release()

    response = StreamingResponse(counted(), media_type="text/event-stream", background=BackgroundTask(lease.release))
    return response, lease


def random_weights_warnings(random_weights: bool, model: str) -> list[str]:
    """The warning every answer made on a random preset carries."""
    return [RANDOM_WEIGHTS_WARNING.format(name=model)] if random_weights else []


def adaptation_warnings(numbers: list[int], results: list[PageResult]) -> list[str]:
    """A warning for each page whose retention the adaptive policy lowered under load, saying why."""
    out = []
    for number, result in zip(numbers, results, strict=True):
        adaptation, stats = result.stats.adaptation, result.stats
        if adaptation is not None and adaptation.adapted:
            out.append(
                f"page {number}: retention lowered to {stats.retention:g} (asked {stats.retention_requested.value}, "
                f"cap {adaptation.cap:g}) because pages waited {adaptation.queue_wait_s:g} s for the model, over "
                f"the {adaptation.target_wait_s:g} s target; send adapt=false to pin a page's retention"
            )
    return out


def page_warnings(numbers: list[int], results: list[PageResult], max_new_tokens: int) -> list[str]:
    """What every door's answer says of its pages: a retention lowered under load, a page cut at its token
    budget (the same sentences on every door)."""
    stopped = [
        f"page {number} stopped at max_new_tokens ({max_new_tokens}) or the position limit"
        for number, result in zip(numbers, results, strict=True)
        if result.stats.finish_reason == "length"
    ]
    return adaptation_warnings(numbers, results) + stopped


def build_response(
    model: str,
    random_weights: bool,
    options: OcrOptions,
    numbers: list[int],
    results: list[PageResult],
    notes: list[str],
    wall_ms: float,
) -> OcrResponse:
    """The /v1/ocr answer: pages, their markdown joined, request statistics and every warning."""
    pages = [PageOut(page=number, **r.model_dump()) for number, r in zip(numbers, results, strict=True)]
    warnings = random_weights_warnings(random_weights, model) + notes
    warnings += page_warnings(numbers, results, options.max_new_tokens)
    return OcrResponse(
        model=model,
        random_weights=random_weights,
        mode=options.mode.value,
        task=options.task.value,
        pruner=options.pruner,
        retention=options.retention,
        markdown=PAGE_SEPARATOR.join(p.markdown for p in pages),
        pages=pages,
        stats=aggregate(results, wall_ms),
        warnings=warnings,
    )
