"""``POST /v1/ocr`` with a JSON body: the shape of Mistral's OCR API, which LiteLLM's OCR call speaks.

``{"model": ..., "document": {"type": "document_url" | "image_url", ...}, "pages": [0, 2] | "0,2-4"}``
-> ``{"pages": [{"index", "markdown", "images", "dimensions"}], "model", "usage_info"}``.
The content type selects it: a JSON body comes here, a multipart form to the form route,
which stays exactly as it is. Both share the walk (limits, scheduler, errors) and the
statistics (in an extra ``rtprune`` field here).

Every field of Mistral's OCR request is accepted, so its SDK works with its defaults (it always
sends ``include_blocks``): the ones that change nothing here are named in a warning; the ones
this service cannot honour (annotations, files in Mistral's store) are a 422 that says why.
"""

from __future__ import annotations

import itertools
import re
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import Scope

from service.api.chat_schema import ImageUrl, Name, Short, Text
from service.api.deps import SchedulerDep, SettingsDep
from service.api.doors import (
    ERROR_RESPONSES,
    open_door,
    open_upload,
    page_request,
    page_warnings,
    random_weights_warnings,
    read_url,
    wait_for,
)
from service.engine.options import MAX_NEW_TOKENS, PageKnobs, in_one_sentence
from service.errors import InvalidParameter
from service.inputs import PDF_DPI, PageRangeOutside, is_pdf


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
    document_name: Name | None = None


class ImageUrlDocument(BaseModel):
    type: Literal["image_url"]
    image_url: str | ImageUrl = Field(
        description="data:image/...;base64,... (or http(s) where fetching is allowed), or {url: ...}"
    )

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


class FileDocument(BaseModel):
    type: Literal["file"]
    file_id: Short


PAGE_LIST = re.compile(r"^\s*\d{1,5}\s*(-\s*\d{1,5}\s*)?(,\s*\d{1,5}\s*(-\s*\d{1,5}\s*)?)*$")
PageNumber = Annotated[int, Field(ge=0, le=99_999)]


PAGES_IN_WORDS = in_one_sentence(
    lambda _: "pages must be a list of 0-based page numbers, or a string of numbers and ranges such as '0,2-4'"
)


def parse_pages(pages: list[int] | str) -> list[tuple[int, int]]:
    """Mistral's page selection, 0-based — a list, or a string such as ``"0,2-4"`` (ranges inclusive) — as
    sorted, merged ranges. Nothing is expanded here: a 16 KB string of ``0-99999`` ranges asks for
    hundreds of millions of pages; the document's size bounds them before any list of pages is made.
    InvalidParameter for a reversed range."""
    if isinstance(pages, list):
        return _merged([(page, page) for page in pages])
    if not PAGE_LIST.match(pages):
        raise InvalidParameter(
            f"pages {pages[:40]!r} is not a page list: write numbers and ranges such as '0,2-4' (0-based)",
            param="pages",
        )
    ranges = []
    for part in pages.split(","):
        first, _, last = "".join(part.split()).partition("-")
        low, high = int(first), int(last or first)
        if high < low:
            raise InvalidParameter(f"pages: the range {low}-{high} runs backwards", param="pages")
        ranges.append((low, high))
    return _merged(ranges)


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping or touching inclusive ranges joined, in order."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


# Mistral's fields that change nothing here: accepted when set, and named in a warning (field -> why)
WITHOUT_EFFECT = {
    "include_image_base64": "figures are not extracted: images stay empty",
    "image_limit": "figures are not extracted",
    "image_min_size": "figures are not extracted",
    "table_format": "tables come as the model writes them (HTML inside the markdown)",
    "extract_header": "headers stay in the markdown",
    "extract_footer": "footers stay in the markdown",
    "include_blocks": "block boxes are not returned (the grounding task's boxes are in rtprune-ocr's form answer)",
    "confidence_scores_granularity": "confidence scores are not computed",
}
# ... and those it cannot honour: a 422 when set (field -> why)
UNSUPPORTED = {
    "bbox_annotation_format": "annotations need a model that follows a JSON schema; DeepSeek-OCR transcribes pages",
    "document_annotation_format": "annotations need a model that follows a JSON schema; DeepSeek-OCR transcribes pages",
    "document_annotation_prompt": "annotations need a model that follows a JSON schema; DeepSeek-OCR transcribes pages",
}


class MistralOcrRequest(BaseModel):
    """Mistral's OCR request, every field of it (mistralai 3.7), plus this service's own two."""

    model_config = ConfigDict(extra="forbid")

    model: Short | None = Field(None, description="any id is accepted; the answer names the model that ran")
    id: Short | None = None
    document: DocumentUrl | ImageUrlDocument | FileDocument = Field(discriminator="type")
    pages: Annotated[list[PageNumber] | str, PAGES_IN_WORDS] | None = Field(
        None, description="0-based pages: a list, or numbers and ranges such as '0,2-4'; default all"
    )
    include_image_base64: bool | None = None
    image_limit: int | None = None
    image_min_size: int | None = None
    bbox_annotation_format: Annotated[dict[str, Any], Field(max_length=64)] | None = None
    document_annotation_format: Annotated[dict[str, Any], Field(max_length=64)] | None = None
    document_annotation_prompt: Text | None = None
    table_format: Literal["markdown", "html"] | None = None
    extract_header: bool | None = None
    extract_footer: bool | None = None
    include_blocks: bool | None = None
    confidence_scores_granularity: Literal["word", "page", "block"] | None = None
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS, description="rtprune-ocr: most tokens a page")
    rtprune: PageKnobs | None = Field(None, description="rtprune-ocr's page knobs (mode, pruner, retention, ...)")

    def url(self) -> str:
        """The document's URL; 422 for a file in Mistral's store, which this server cannot read."""
        if isinstance(self.document, FileDocument):
            raise InvalidParameter(
                "document.file_id names a file in Mistral's store; send the document inline as a "
                "document_url or image_url (a data: URL)",
                param="document",
            )
        return self.document.document_url if isinstance(self.document, DocumentUrl) else self.document.url

    def without_effect(self) -> list[str]:
        """A warning for each field set that changes nothing here; 422 for one this server cannot honour."""
        for field, why in UNSUPPORTED.items():
            if getattr(self, field) is not None:
                raise InvalidParameter(f"{field} is not supported: {why}", param=field)
        return [f"{field} has no effect here: {why}" for field, why in WITHOUT_EFFECT.items() if _asked(self, field)]


def _asked(body: MistralOcrRequest, field: str) -> bool:
    """Whether a field asks for something (``include_blocks: false`` asks for nothing)."""
    value = getattr(body, field)
    return value is not None and value is not False and not (field == "table_format" and value == "html")


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
    scheduler: SchedulerDep,
    settings: SettingsDep,
) -> MistralOcrResponse:
    accepted_at = time.monotonic()
    scheduler.ensure_ready()  # 503 before anything else is checked
    ignored = body.without_effect()
    url = body.url()
    wanted = parse_pages(body.pages) if body.pages is not None else None
    if wanted == []:
        raise InvalidParameter("pages selects no page; leave it out to OCR every page", param="pages")
    door = open_door(scheduler, mistral_options(body), settings)
    data = await read_url(request, url, settings)
    # only the pages asked for count against the limits: [0, 999] of a long PDF is two pages, not 1,000
    selection = [(low + 1, high + 1) for low, high in wanted] if wanted and is_pdf(data) else None
    try:
        document = await open_upload(data, settings, selection=selection)
    except PageRangeOutside as exc:  # said 0-based, as the request numbers its pages
        check_pages_exist(wanted or [], exc.n_pages)
        raise
    if wanted is not None and selection is None:
        check_pages_exist(wanted, len(document))  # an image has one page
    request_pages = page_request(request, document, door.options, settings, accepted_at)
    scheduler.submit(request_pages)
    results = await wait_for(request, request_pages, settings)
    pages = [
        MistralPage(index=number - 1, markdown=result.markdown, dimensions=_dimensions(result))
        for number, result in zip(document.numbers, results, strict=True)
    ]
    warnings = random_weights_warnings(door.random_weights, settings.model)
    warnings += door.notes + ignored + page_warnings([p.index + 1 for p in pages], results, door.options.max_new_tokens)
    return MistralOcrResponse(
        pages=pages,
        model=settings.model,
        usage_info=UsageInfo(pages_processed=len(pages), doc_size_bytes=len(data)),
        rtprune={"pages": [r.stats.model_dump(mode="json") for r in results], "warnings": warnings},
    )


def check_pages_exist(ranges: list[tuple[int, int]], n_pages: int) -> None:
    """InvalidParameter naming (the first few of) the 0-based pages the document does not have, counted
    from the ranges (never expanded)."""
    outside = [(max(low, n_pages), high) for low, high in ranges if high >= n_pages]
    if outside:
        count = sum(high - low + 1 for low, high in outside)
        first = list(itertools.islice((p for low, high in outside for p in range(low, high + 1)), 5))
        shown = ", ".join(map(str, first)) + (f" and {count - 5} more" if count > 5 else "")
        raise InvalidParameter(f"pages {shown} are outside the document's {n_pages} pages (0-based)", param="pages")


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
