"""POST /v1/ocr: parse the form, decode the upload, queue the job, shape the response."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request, UploadFile
from pydantic import ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from service.api.deps import get_scheduler, get_settings
from service.engine import RANDOM_WEIGHTS_WARNING, Cancelled, OcrOptions, PageResult, PromptTooLong
from service.errors import ClientGone, DeadlineExceeded, ErrorResponse, InternalError, InvalidParameter, ServiceError
from service.inputs import Document, UploadError, open_document
from service.scheduler import Job, Scheduler
from service.schemas import PAGE_SEPARATOR, OcrResponse, PageOut, aggregate
from service.settings import ServiceSettings

log = logging.getLogger(__name__)
router = APIRouter(tags=["ocr"])
DISCONNECT_POLL_S = 0.1


class OcrForm(OcrOptions):
    """The multipart form: the file plus every per-request option of the engine."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file: UploadFile = Field(
        description="PNG, JPEG, WebP, TIFF, BMP, GIF, or PDF (one file part)", json_schema_extra={"format": "binary"}
    )
    pages: str | None = Field(
        None,
        pattern=r"^\s*\d{1,5}\s*(-\s*\d{0,5}\s*)?$",
        description="PDF pages, 1-based: '3', '2-5' or '2-' (to the end); default all",
    )

    def options(self) -> OcrOptions:
        """The engine options the caller set (the form's other fields, of subclasses too, left out)."""
        return OcrOptions(**self.model_dump(include=set(OcrOptions.model_fields), exclude_unset=True))

    def page_range(self) -> tuple[int, int | None] | None:
        if self.pages is None:
            return None
        first, _, last = self.pages.replace(" ", "").partition("-")
        if not _:  # a single page
            return int(first), int(first)
        return int(first), int(last) if last else None


ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        401: "missing or wrong X-API-Key",
        413: "upload, image or PDF over a limit",
        415: "unsupported file type",
        422: "invalid parameter or corrupt file",
        499: "client closed the request",
        500: "internal error",
        503: "not ready, queue full, shutting down or out of memory (Retry-After)",
        504: "deadline exceeded",
    }.items()
}


async def wait_for(request: Request, job: Job) -> list[PageResult]:
    """Await the scheduler's result; cancel the job if the client leaves or the deadline passes."""
    future = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
            if done:
                return future.result()
            if time.monotonic() > job.deadline:
                raise DeadlineExceeded("the request ran past its deadline; its work was cancelled")
            if await request.is_disconnected():
                raise ClientGone("the client closed the connection; its work was cancelled")
    except Cancelled:
        if time.monotonic() > job.deadline:
            raise DeadlineExceeded("the request ran past its deadline; its work was cancelled") from None
        raise ClientGone("the request was cancelled") from None
    except (ServiceError, UploadError):
        raise
    except PromptTooLong as exc:
        raise InvalidParameter(str(exc)) from None
    except Exception as exc:  # the engine failed on this request only; the scheduler goes on
        log.error("request %s failed in the engine", job.request_id, exc_info=exc, extra={"request_id": job.request_id})
        raise InternalError("the engine failed on this request; the request id is in the server logs") from None
    finally:
        job.cancel.set()  # no-op when finished; stops the scheduler's work otherwise
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # never an unretrieved exception


@router.post(
    "/v1/ocr", summary="OCR an image or PDF to markdown, with RTPrune visual-token pruning", responses=ERROR_RESPONSES
)
async def ocr(
    request: Request,
    form: Annotated[OcrForm, Form()],
    scheduler: Annotated[Scheduler, Depends(get_scheduler)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
) -> OcrResponse:
    accepted_at = time.monotonic()
    engine = scheduler.ensure_ready()
    options, notes, page_range = checked_options(form, engine)
    _, document = await read_upload(request, form, settings, page_range)
    job = request_job(request, document, options, settings, accepted_at)
    scheduler.submit(job)
    results = await wait_for(request, job)
    return build_response(
        settings.model,
        engine.random_weights,
        options,
        document.numbers,
        results,
        notes,
        (time.monotonic() - accepted_at) * 1e3,
    )


def checked_options(form: OcrForm, engine) -> tuple[OcrOptions, list[str], tuple[int, int | None] | None]:
    """The form's options with the model's defaults, notes on options without effect, and the page range;
    InvalidParameter (422) for what only the model can refuse."""
    try:
        options, notes = engine.resolve_options(form.options(), form.model_fields_set)
        options.validate_for_run(engine.version)
        return options, notes, form.page_range()
    except ValueError as exc:
        raise InvalidParameter(str(exc)) from None


async def read_upload(
    request: Request, form: OcrForm, settings: ServiceSettings, page_range: tuple[int, int | None] | None
) -> tuple[bytes, Document]:
    """The upload's bytes and Document, every limit checked before any PDF page is rendered."""
    if len((await request.form()).getlist("file")) > 1:  # parsed once by FastAPI; this is its cache
        raise InvalidParameter("send one `file` part per request; this one has several")
    data = await form.file.read()
    return data, await open_upload(data, settings, page_range)


def request_job(
    request: Request, document: Document, options: OcrOptions, settings: ServiceSettings, accepted_at: float
) -> Job:
    """A scheduler job for a request that waits for its answer: the request's deadline and id."""
    return Job(document, options, accepted_at + settings.request_timeout_s, request.state.request_id, accepted_at)


async def open_upload(
    data: bytes, settings: ServiceSettings, page_range: tuple[int, int | None] | None = None
) -> Document:
    """Bytes of any front door (form, data URL) -> Document, under the service's limits."""
    return await run_in_threadpool(
        open_document,
        data,
        max_pixels=settings.max_image_pixels,
        max_pdf_pages=settings.max_pdf_pages,
        max_document_pixels=settings.max_document_pixels,
        page_range=page_range,
    )


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
    warnings = [RANDOM_WEIGHTS_WARNING.format(name=model)] if random_weights else []
    warnings += notes + [
        f"page {p.page} stopped at max_new_tokens ({options.max_new_tokens}) or the position limit"
        for p in pages
        if p.stats.finish_reason == "length"
    ]
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
