"""POST /v1/ocr with a multipart form: the upload and the engine's options, answered with markdown,
boxes and statistics."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Form, Request

from service.api.deps import SchedulerDep, SettingsDep
from service.api.doors import (
    ERROR_RESPONSES,
    OcrForm,
    build_response,
    open_door,
    page_request,
    read_upload,
    wait_for,
)
from service.schemas import OcrResponse

router = APIRouter(tags=["ocr"])


@router.post(
    "/v1/ocr", summary="OCR an image or PDF to markdown, with RTPrune visual-token pruning", responses=ERROR_RESPONSES
)
async def ocr(
    request: Request,
    form: Annotated[OcrForm, Form()],
    scheduler: SchedulerDep,
    settings: SettingsDep,
) -> OcrResponse:
    accepted_at = time.monotonic()
    door = open_door(scheduler, form.chosen(), settings)
    _, document = await read_upload(request, form, settings, form.page_range())
    pages = page_request(request, document, door.options, settings, accepted_at)
    scheduler.submit(pages)
    results = await wait_for(request, pages, settings)
    wall_ms = (time.monotonic() - accepted_at) * 1e3
    numbers = document.numbers
    return build_response(settings.model, door.random_weights, door.options, numbers, results, door.notes, wall_ms)
