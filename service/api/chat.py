"""OpenAI-compatible chat completions: the body DeepSeek-OCR's vLLM recipe sends works here unchanged.

One user turn with one image (a data URL; http(s) only when ``RTPRUNE_ALLOW_URL_FETCH`` is on)
and a task prompt such as "Free OCR." or "<image>\\n<|grounding|>Convert the document to
markdown.". vLLM's knobs (``vllm_xargs``: ngram_size, window_size, whitelist_token_ids;
``skip_special_tokens``) map onto ours; our own (mode, pruner, retention, positions, max_crops)
go in ``rtprune``. Decoding is greedy: a temperature other than 0 is a 422, never silently
ignored. The page walks the same way as ``/v1/ocr`` (limits, scheduler, errors).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from service.api.common import (
    ERROR_RESPONSES,
    door_options,
    event_stream,
    failure,
    open_upload,
    page_request,
    read_url,
    wait_for,
)
from service.api.deps import get_scheduler, get_settings
from service.engine import PageResult
from service.engine.decode.sequence import TABLE_CELL_IDS
from service.engine.options import PageKnobs
from service.errors import InvalidParameter
from service.scheduler import PageRequest, Scheduler
from service.settings import ServiceSettings

router = APIRouter(tags=["openai"])
FINISH = {"eos": "stop", "length": "length"}


class ImageUrl(BaseModel):
    url: str = Field(description="data:image/...;base64,... (or http(s) when the server allows fetching)")
    detail: str | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None


class ChatMessage(BaseModel):
    role: Literal["user"] = Field(description="DeepSeek-OCR takes one user turn")
    content: str | list[ContentPart]


class VllmXargs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ngram_size: int = Field(30, ge=0, le=512)
    window_size: int = Field(90, ge=0, le=8192)
    whitelist_token_ids: list[int] | None = Field(None, description=f"only {sorted(TABLE_CELL_IDS)} is supported")


class StreamOptions(BaseModel):
    include_usage: bool = True


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=1)
    max_tokens: int | None = Field(None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(None, ge=1, le=8192)
    temperature: float | None = Field(None, description="only 0 (greedy) is supported")
    top_p: float | None = Field(None, description="only 1 is supported")
    n: int | None = Field(None, ge=1, le=1)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    skip_special_tokens: bool = True
    vllm_xargs: VllmXargs | None = None
    rtprune: PageKnobs | None = Field(None, description="rtprune-ocr's page knobs (mode, pruner, retention, ...)")


def chat_options(body: ChatRequest) -> tuple[dict[str, Any], str]:
    """The options a chat body chose (our field names) and its image URL; InvalidParameter for anything
    we cannot honour."""
    if body.temperature not in (None, 0, 0.0) or body.top_p not in (None, 1, 1.0):
        raise InvalidParameter("decoding is greedy: temperature must be 0 (and top_p 1); sampling is not supported")
    content = body.messages[0].content
    parts = [ContentPart(type="text", text=content)] if isinstance(content, str) else content
    images = [p.image_url.url for p in parts if p.type == "image_url" and p.image_url]
    if len(images) != 1:
        raise InvalidParameter(f"send exactly one image_url part; this message has {len(images)}")
    text = "\n".join(p.text for p in parts if p.type == "text" and p.text).strip()
    xargs = body.vllm_xargs or VllmXargs()
    if xargs.whitelist_token_ids is not None and set(xargs.whitelist_token_ids) != TABLE_CELL_IDS:
        raise InvalidParameter(f"vllm_xargs.whitelist_token_ids: only {sorted(TABLE_CELL_IDS)} is supported")
    knobs = body.rtprune.model_dump(exclude_unset=True) if body.rtprune else {}  # unset: the engine's defaults
    prompt = None if not text else text if "<image>" in text else f"<image>\n{text}"
    chosen = {**knobs, "prompt": prompt, "ngram_size": xargs.ngram_size}
    chosen["ngram_window"] = max(xargs.window_size, xargs.ngram_size)
    if body.max_completion_tokens or body.max_tokens:
        chosen["max_new_tokens"] = body.max_completion_tokens or body.max_tokens
    return chosen, images[0]


@router.get("/v1/models", summary="The served model (OpenAI-compatible)")
async def models(settings: Annotated[ServiceSettings, Depends(get_settings)]) -> dict:
    return {"object": "list", "data": [{"id": settings.model, "object": "model", "owned_by": "rtprune-ocr"}]}


@router.post(
    "/v1/chat/completions", summary="OCR one image through an OpenAI chat completion", responses=ERROR_RESPONSES
)
async def chat_completions(
    request: Request,
    body: ChatRequest,
    scheduler: Annotated[Scheduler, Depends(get_scheduler)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
):
    engine = scheduler.ensure_ready()
    chosen, url = chat_options(body)
    options, notes = door_options(engine, chosen)  # e.g. compact positions on the vLLM decoder
    document = await open_upload(await read_url(request, url, settings), settings, page_range=(1, 1))
    accepted_at = time.monotonic()
    pages = page_request(request, document, options, settings, accepted_at)
    skip = body.skip_special_tokens
    reply = Reply(body.model or settings.model, engine.detokenizer(skip), engine.strip_special if skip else None, notes)
    if body.stream:
        tokens: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        pages.on_token = lambda page, position, token: loop.call_soon_threadsafe(tokens.put_nowait, (position, token))
        usage = body.stream_options is None or body.stream_options.include_usage
        response, lease = event_stream(request, reply.stream(request, pages, tokens, usage, settings))
        try:
            scheduler.submit(pages)
        except BaseException:
            lease.release()
            raise
        return response
    scheduler.submit(pages)
    return reply.completion((await wait_for(request, pages, settings))[0])


class Reply:
    """Shapes chat.completion objects and chunks from a page's result and tokens."""

    def __init__(
        self,
        model: str,
        detokenize: Callable[[list[int]], str],
        strip_special: Callable[[str], str] | None,
        warnings: list[str] | None = None,
    ) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.detokenize, self.strip_special, self.warnings = model, detokenize, strip_special, warnings

    def _base(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def text(self, tokens: list[int]) -> str:
        """Text of tokens not sent yet: the byte-level tokenizer decodes piece by piece, so each step
        decodes only what is new (decoding the whole output each step would cost O(n²) on long pages)."""
        return self.detokenize(tokens)

    def delta(self, generated: list[int], shown: int) -> tuple[str, int]:
        """The text the tokens after ``shown`` add, and the new ``shown``; nothing while the last token
        ends inside a multi-byte character (its text would end in U+FFFD)."""
        text = self.text(generated[shown:])
        if text and not text.endswith("\ufffd"):
            return text, len(generated)
        return "", shown

    @staticmethod
    def usage(page: PageResult) -> dict:
        s = page.stats
        return {
            "prompt_tokens": s.prompt_tokens,  # the pruned prompt
            "completion_tokens": s.output_tokens,
            "total_tokens": s.prompt_tokens + s.output_tokens,
        }

    def completion(self, page: PageResult) -> dict:
        content = self.strip_special(page.text) if self.strip_special else page.text
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": FINISH[page.stats.finish_reason],
        }
        return {
            **self._base("chat.completion"),
            "choices": [choice],
            "usage": self.usage(page),
            "rtprune": page.stats.model_dump(mode="json"),
            "warnings": self.warnings or [],
        }

    def chunk(self, delta: dict, finish: str | None = None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        body = {**self._base("chat.completion.chunk"), "choices": [choice]}
        return f"data: {json.dumps({**body, **extra}, ensure_ascii=False)}\n\n"

    async def stream(
        self, request: Request, pages: PageRequest, tokens: asyncio.Queue, usage: bool, settings: ServiceSettings
    ) -> AsyncIterator[str]:
        """Server-sent events: a role chunk, text deltas as tokens are decoded, a final chunk, [DONE].
        A client that leaves cancels the work (the generator is closed and the page cancelled). A failure
        after the status line is an ``error`` event with the code and message a plain request gets."""
        future = asyncio.wrap_future(pages.future)
        generated: list[int] = []
        shown = 0  # tokens whose text has been sent
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            while not (future.done() and tokens.empty()):
                try:
                    position, token = await asyncio.wait_for(tokens.get(), timeout=0.1)
                except TimeoutError:
                    if time.monotonic() > pages.deadline or await request.is_disconnected():
                        return
                    continue
                if position == len(generated):  # each position once, in order
                    generated.append(token)
                    delta, shown = self.delta(generated, shown)
                    if delta:
                        yield self.chunk({"content": delta})
            try:
                page = future.result()[0]
            except Exception as exc:  # the status line is sent: say it in the stream
                error = failure(exc, pages, settings)
                body = {"code": error.code, "message": error.message, "request_id": pages.request_id}
                yield f"data: {json.dumps({'error': body})}\n\n"
                return
            if delta := self.text(generated[shown:]):
                yield self.chunk({"content": delta})
            extra = {"usage": self.usage(page), "rtprune": page.stats.model_dump(mode="json")} if usage else {}
            extra["warnings"] = self.warnings or []
            yield self.chunk({}, FINISH[page.stats.finish_reason], **extra)
            yield "data: [DONE]\n\n"
        finally:
            pages.cancel.set()
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
