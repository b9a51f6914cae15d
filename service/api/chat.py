"""OpenAI-compatible chat completions: the body DeepSeek-OCR's vLLM recipe sends works here unchanged.

One user turn with one image (a data URL; http(s) only when ``RTPRUNE_ALLOW_URL_FETCH`` is on)
and a task prompt such as "Free OCR." or "<image>\\n<|grounding|>Convert the document to
markdown.", after any number of system (or developer) turns: OCR pipelines send their instruction
there. DeepSeek-OCR knows a few fixed prompts, so a system instruction is read as the closest of its
tasks when the user turn has no text (the answer's warnings say which), and left unused when it has.

vLLM's knobs (``vllm_xargs``: ngram_size, window_size, whitelist_token_ids; ``skip_special_tokens``)
map onto ours; our own (mode, pruner, retention, positions, max_crops) go in ``rtprune``. The fields
frameworks send by habit (``user``, ``metadata``, ``stop``, penalties, ``logprobs``,
``response_format``, ...) are accepted at their neutral values; any other value is a 400 that says
why, never silently ignored (decoding is greedy: ``temperature`` must be 0). Any model id is
accepted, by chat and by ``GET /v1/models/{id}`` alike (clients send their own), and the answer
names the model that ran. The page walks the same way as ``/v1/ocr`` (limits, scheduler, errors).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request

from service.api.chat_schema import INSTRUCTION_ROLES, NEUTRAL, TURN_RULE, ChatMessage, ChatRequest, VllmXargs
from service.api.deps import SchedulerDep, SettingsDep
from service.api.doors import (
    ERROR_RESPONSES,
    event_stream,
    failure,
    open_door,
    open_upload,
    page_request,
    page_warnings,
    random_weights_warnings,
    read_url,
    wait_for,
)
from service.engine import Cancelled, PageResult
from service.engine.decode.sequence import TABLE_CELL_IDS
from service.engine.names import Task
from service.engine.options import MAX_NEW_TOKENS
from service.engine.prompts import IMAGE_TOKEN, TASK_PROMPTS
from service.errors import InvalidParameter
from service.scheduler import PageRequest
from service.settings import ServiceSettings

router = APIRouter(tags=["openai"])
FINISH = {"eos": "stop", "length": "length"}


def chat_options(body: ChatRequest) -> tuple[dict[str, Any], str, list[str]]:
    """The options a chat body chose (our field names), its image URL and notes on how its turns were
    read; InvalidParameter for anything we cannot honour."""
    refuse_non_neutral(body)
    user = the_user_turn(body.messages)
    images = [p.image_url.url for p in user.parts() if p.type == "image_url" and p.image_url]
    if len(images) != 1:
        raise InvalidParameter(
            f"send exactly one image_url part in the user turn; it has {len(images)} ({TURN_RULE})",
            param="messages",
        )
    text, notes = user.text(), []
    instruction = "\n".join(m.text() for m in body.messages if m.role in INSTRUCTION_ROLES).strip()
    if instruction and text:
        notes.append("the system turn was not used: the user turn's text is the prompt")
    elif instruction:
        text, note = prompt_for_instruction(instruction)
        notes.append(note)
    xargs = body.vllm_xargs or VllmXargs()
    if xargs.whitelist_token_ids is not None and set(xargs.whitelist_token_ids) != TABLE_CELL_IDS:
        raise InvalidParameter(
            f"vllm_xargs.whitelist_token_ids: only {sorted(TABLE_CELL_IDS)} is supported",
            param="vllm_xargs.whitelist_token_ids",
        )
    knobs = body.rtprune.model_dump(exclude_unset=True) if body.rtprune else {}  # unset: the engine's defaults
    prompt = None if not text else text if "<image>" in text else f"<image>\n{text}"
    chosen = {**knobs, "prompt": prompt, "ngram_size": xargs.ngram_size}
    chosen["ngram_window"] = max(xargs.window_size, xargs.ngram_size)
    if body.max_completion_tokens or body.max_tokens:
        chosen["max_new_tokens"] = body.max_completion_tokens or body.max_tokens
    return chosen, images[0], notes


def the_user_turn(messages: list[ChatMessage]) -> ChatMessage:
    """The one user turn, last, after instruction turns only; InvalidParameter naming the rule otherwise."""
    roles = [m.role for m in messages]
    if roles.count("user") != 1 or roles[-1] != "user" or set(roles[:-1]) - set(INSTRUCTION_ROLES):
        raise InvalidParameter(f"{TURN_RULE}; this request's roles are {roles}", param="messages")
    for index, message in enumerate(messages[:-1]):
        if any(p.type != "text" for p in message.parts()):
            raise InvalidParameter(
                f"messages[{index}] ({message.role}) may hold text only: the image goes in the user turn",
                param=f"messages[{index}].content",
            )
    if not any(p.type == "image_url" for p in messages[-1].parts()):
        raise InvalidParameter(
            f"the user turn has no image_url part: this server reads pages and answers no text-only "
            f"request ({TURN_RULE}); to check that it is up, GET /readyz or /v1/models",
            param="messages",
        )
    return messages[-1]


# An instruction's words -> the DeepSeek-OCR task they come closest to (first match wins).
INSTRUCTION_TASKS: tuple[tuple[tuple[str, ...], Task], ...] = (
    (("markdown", "convert the document", "layout"), Task.markdown),
    (("ocr", "text", "transcri", "extract"), Task.free),
    (("figure", "chart", "diagram"), Task.figure),
    (("describe", "caption"), Task.describe),
)


def prompt_for_instruction(instruction: str) -> tuple[str, str]:
    """A system instruction as DeepSeek-OCR's prompt: one of its own prompts verbatim, else the task whose
    words it uses (markdown when none: a page's usual ask); with the warning that says which."""
    if IMAGE_TOKEN in instruction or "<|grounding|>" in instruction:
        return instruction, "the system turn's text is the prompt (it is a DeepSeek-OCR prompt)"
    lowered = instruction.lower()
    task = next((task for words, task in INSTRUCTION_TASKS if any(w in lowered for w in words)), Task.markdown)
    prompt = TASK_PROMPTS[task]
    note = (
        f"the system turn was read as DeepSeek-OCR's {task.value!r} task (prompt {prompt!r}): the model knows a "
        "few fixed prompts; send one as the user turn's text to choose"
    )
    return prompt, note


def refuse_non_neutral(body: ChatRequest) -> None:
    """InvalidParameter (400 here) naming the first field set to a value other than its neutral one."""
    for field, (neutral, why) in NEUTRAL.items():
        value = getattr(body, field)
        if value is not None and not neutral(value):
            raise InvalidParameter(why, param=field)


def model_card(request: Request) -> dict:
    """The served model as OpenAI lists it; ``created`` is when this server started."""
    settings = request.app.state.settings
    created = request.app.state.started_at
    return {"id": settings.model, "object": "model", "created": created, "owned_by": "rtprune-ocr"}


@router.get("/v1/models", summary="The served model (OpenAI-compatible)")
async def models(request: Request) -> dict:
    return {"object": "list", "data": [model_card(request)]}


@router.get("/v1/models/{model_id:path}", summary="One model (OpenAI-compatible)", responses=ERROR_RESPONSES)
async def model(model_id: str, request: Request) -> dict:
    """Any id, as chat completions accept any (clients send their own): the served model under that name,
    ``root`` naming what runs."""
    return {**model_card(request), "id": model_id, "root": request.app.state.settings.model}


@router.post(
    "/v1/chat/completions", summary="OCR one image through an OpenAI chat completion", responses=ERROR_RESPONSES
)
async def chat_completions(
    request: Request,
    body: ChatRequest,
    scheduler: SchedulerDep,
    settings: SettingsDep,
):
    scheduler.ensure_ready()  # 503 before the body is read into options
    chosen, url, turn_notes = chat_options(body)
    door = open_door(scheduler, chosen, settings)
    notes = [*turn_notes, *door.notes]  # e.g. compact positions on the vLLM decoder
    document = await open_upload(await read_url(request, url, settings), settings, page_range=(1, 1))
    accepted_at = time.monotonic()
    pages = page_request(request, document, door.options, settings, accepted_at)
    warnings = random_weights_warnings(door.random_weights, settings.model) + notes
    reply = Reply(settings.model, door.detokenizer(body.skip_special_tokens), warnings, door.options.max_new_tokens)
    if body.stream:
        tokens: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        pages.on_token = lambda page, position, token: loop.call_soon_threadsafe(tokens.put_nowait, (position, token))
        usage = body.stream_options is not None and body.stream_options.include_usage
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
        warnings: list[str] | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.include_usage = False
        self.created = int(time.time())
        self.model, self.detokenize, self.warnings = model, detokenize, warnings
        self.max_new_tokens = max_new_tokens

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

    def warnings_for(self, page: PageResult) -> list[str]:
        """The request's warnings (random weights, notes on its options), then the page's own (a retention
        lowered under load, a page cut at its token budget), as every door words them."""
        return [*(self.warnings or []), *page_warnings([1], [page], self.max_new_tokens)]

    @staticmethod
    def usage(page: PageResult) -> dict:
        s = page.stats
        return {
            "prompt_tokens": s.prompt_tokens,  # the pruned prompt
            "completion_tokens": s.output_tokens,
            "total_tokens": s.prompt_tokens + s.output_tokens,
        }

    def completion(self, page: PageResult) -> dict:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": self.text(page.tokens)},  # decoded as the stream decodes
            "finish_reason": FINISH[page.stats.finish_reason],
        }
        return {
            **self._base("chat.completion"),
            "choices": [choice],
            "usage": self.usage(page),
            "rtprune": page.stats.model_dump(mode="json"),
            "warnings": self.warnings_for(page),
        }

    def chunk(self, delta: dict | None, finish: str | None = None, **extra) -> str:
        """One chunk; ``delta`` None is OpenAI's usage chunk, with no choice."""
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        body = {**self._base("chat.completion.chunk"), "choices": choices}
        if self.include_usage:
            body["usage"] = None  # as OpenAI: null on every chunk but the last
        return f"data: {json.dumps({**body, **extra}, ensure_ascii=False)}\n\n"

    async def stream(
        self, request: Request, pages: PageRequest, tokens: asyncio.Queue, usage: bool, settings: ServiceSettings
    ) -> AsyncIterator[str]:
        """Server-sent events: a role chunk, text deltas as tokens are decoded, a final chunk (finish reason,
        statistics, warnings), with ``include_usage`` OpenAI's usage chunk (no choices), then [DONE].
        A client that leaves cancels the work (the generator is closed and the page cancelled). A failure
        after the status line is an ``error`` event with the code and message a plain request gets. While
        the page waits in the queue, a ``: keep-alive`` comment every ``sse_keepalive_s`` keeps proxies
        from cutting the stream (clients ignore comments)."""
        future = asyncio.wrap_future(pages.future)
        self.include_usage = usage
        generated: list[int] = []
        shown = 0  # tokens whose text has been sent
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            last_sent = time.monotonic()
            while not (future.done() and tokens.empty()):
                try:
                    position, token = await asyncio.wait_for(tokens.get(), timeout=0.1)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    if time.monotonic() > pages.deadline:  # said in the stream, as any failure after the status
                        error = failure(Cancelled("past its deadline"), pages, settings)
                        body = {"code": error.code, "message": error.message, "request_id": pages.request_id}
                        yield f"data: {json.dumps({'error': body})}\n\n"
                        return
                    if time.monotonic() - last_sent >= settings.sse_keepalive_s:
                        last_sent = time.monotonic()
                        yield ": keep-alive\n\n"
                    continue
                if position == len(generated):  # each position once, in order
                    generated.append(token)
                    delta, shown = self.delta(generated, shown)
                    if delta:
                        last_sent = time.monotonic()
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
            stats = {"rtprune": page.stats.model_dump(mode="json"), "warnings": self.warnings_for(page)}
            yield self.chunk({}, FINISH[page.stats.finish_reason], **stats)
            if usage:
                yield self.chunk(None, usage=self.usage(page))
            yield "data: [DONE]\n\n"
        finally:
            pages.cancel.set()
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
