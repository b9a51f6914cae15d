"""``POST /v1/ocr`` with a JSON body: the shape of Mistral's OCR API, which LiteLLM's OCR call speaks.

``{"model": ..., "document": {"type": "document_url" | "image_url", ...}, "pages": [0, 2]}``
-> ``{"pages": [{"index", "markdown", "images", "dimensions"}], "model", "usage_info"}``.
The content type selects it: a JSON body comes here, a multipart form to the form route,
which stays exactly as it is. Both share the walk (limits, scheduler, errors) and the
statistics (in an extra ``rtprune`` field here).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import Scope

from service.api.common import (
    ERROR_RESPONSES,
    door_options,
    open_upload,
    page_request,
    random_weights_warnings,
    read_url,
    wait_for,
)
from service.api.deps import get_scheduler, get_settings
from service.engine.options import PageKnobs
from service.errors import InvalidParameter
from service.inputs import PDF_DPI, is_pdf
from service.scheduler import Scheduler
from service.settings import ServiceSettings


class JsonBodyRoute(APIRoute):
    """Matches only requests whose body is JSON, so the same path can also take a multipart form."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is Match.FULL and not is_json(Headers(scope=scope).get("content-type", "")):
            return Match.NONE, {}
        return match, child


def is_json(content_type: str) -> bool:
    """A JSON media type (``application/json``, ``application/*+json``), parameters aside: a multipart
    boundary that happens to contain "json" is still a form."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


router = APIRouter(tags=["ocr"], route_class=JsonBodyRoute)


class DocumentUrl(BaseModel):
    type: Literal["document_url"]
    document_url: str = Field(description="data:application/pdf;base64,... (or http(s) where fetching is allowed)")
    document_name: str | None = None


class ImageUrlDocument(BaseModel):
    type: Literal["image_url"]
    image_url: str = Field(description="data:image/...;base64,... (or http(s) where fetching is allowed)")


class MistralOcrRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    id: str | None = None
    document: DocumentUrl | ImageUrlDocument = Field(discriminator="type")
    pages: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="0-based pages; default all (an empty list selects nothing: 422)"
    )
    include_image_base64: bool | None = Field(None, description="figures are not extracted: images stay empty")
    max_new_tokens: int | None = Field(None, ge=1, le=8192, description="rtprune-ocr: most tokens a page")
    rtprune: PageKnobs | None = Field(None, description="rtprune-ocr's page knobs (mode, pruner, retention, ...)")


class Dimensions(BaseModel):
    dpi: int
    height: int
    width: int


class MistralPage(BaseModel):
    index: int
    markdown: str
    images: list[dict] = Field(default_factory=list)
    dimensions: Dimensions


class UsageInfo(BaseModel):
    pages_processed: int
    doc_size_bytes: int


class MistralOcrResponse(BaseModel):
    pages: list[MistralPage]
    model: str
    usage_info: UsageInfo
    rtprune: dict = Field(description="rtprune-ocr's statistics and warnings for the request")


@router.post("/v1/ocr", response_model=MistralOcrResponse, include_in_schema=False, responses=ERROR_RESPONSES)
async def mistral_ocr(
    request: Request,
    body: MistralOcrRequest,
    scheduler: Annotated[Scheduler, Depends(get_scheduler)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
) -> MistralOcrResponse:
    accepted_at = time.monotonic()
    engine = scheduler.ensure_ready()
    options, notes = door_options(engine, mistral_options(body))
    url = body.document.document_url if isinstance(body.document, DocumentUrl) else body.document.image_url
    data = await read_url(request, url, settings)
    wanted = sorted(set(body.pages)) if body.pages is not None else None
    # only the pages asked for are measured against the limits (1-based range of the PDF, then a selection)
    span = (wanted[0] + 1, wanted[-1] + 1) if wanted and is_pdf(data) else None
    document = await open_upload(data, settings, span)
    if wanted is not None:
        first = span[0] - 1 if span else 0
        missing = [p for p in wanted if p - first >= len(document)]
        if missing:
            raise InvalidParameter(f"pages {missing} are outside the document's pages (0-based)")
        document = document.select([p - first for p in wanted])
    request_pages = page_request(request, document, options, settings, accepted_at)
    scheduler.submit(request_pages)
    results = await wait_for(request, request_pages, settings)
    pages = [
        MistralPage(index=number - 1, markdown=result.markdown, dimensions=_dimensions(result))
        for number, result in zip(document.numbers, results, strict=True)
    ]
    warnings = random_weights_warnings(engine.random_weights, settings.model)
    return MistralOcrResponse(
        pages=pages,
        model=body.model or settings.model,
        usage_info=UsageInfo(pages_processed=len(pages), doc_size_bytes=len(data)),
        rtprune={"pages": [r.stats.model_dump(mode="json") for r in results], "warnings": warnings + notes},
    )


def mistral_options(body: MistralOcrRequest) -> dict[str, Any]:
    """The options a Mistral OCR body chose, in our field names."""
    chosen = body.rtprune.model_dump(exclude_unset=True) if body.rtprune else {}
    if body.max_new_tokens:
        chosen["max_new_tokens"] = body.max_new_tokens
    return chosen


def _dimensions(result) -> Dimensions:
    """The page's pixel size as OCR'd (a PDF page rendered at ``PDF_DPI``)."""
    width, height = result.page_size
    return Dimensions(dpi=PDF_DPI, height=height, width=width)
