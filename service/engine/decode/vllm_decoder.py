"""A second decoder behind the engine's batch interface: a vLLM server fed with prompt embeddings.

Our process runs everything up to the prompt (preprocess, vision encoder, RTPrune, the assembled
embeddings — BOS, the pruned visual block, the prompt text); vLLM decodes from those embeddings
(``vllm serve ... --enable-prompt-embeds``), with paged attention and its own continuous batching.
:class:`VllmBatch` keeps the :class:`~.contract.DecodeBatch` contract (join / step / remove / rows), so
the scheduler, the static driver and every front door work unchanged:

- **join** starts one streaming ``/v1/completions`` request per page (greedy, ``max_tokens`` the
  page's budget, DeepSeek-OCR's n-gram guard through ``vllm_xargs``, token ids returned);
- **step** collects what the streams delivered since the last step (waiting briefly for something)
  and applies it to the sequences on the caller's thread: tokens, ``on_token``, finish, failure;
- **remove** cancels the streams of rows that leave (a closed stream aborts the request in vLLM).

vLLM numbers positions 0..L-1, so only ``positions=compact`` can be decoded there. Its n-gram
processor mirrors our guard (same window and whitelist) except for ``ngram_size=1``, where it bans
nothing; both are refused before any work (:func:`check_options`). Prefill time is join → first
token (vLLM's queue included), decode time first → last token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import queue
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any

import httpx
import torch

from ..assemble import extend_prompt
from ..model import OcrModel
from ..names import Positions
from .contract import DecoderDown, DecoderRefused
from .sequence import EOS_ID, Generation, NGramGuard, Sequence

log = logging.getLogger(__name__)

STEP_WAIT_S = 0.05  # a step waits this long for the first event, so the scheduler loop does not spin
# Tokens per stream chunk after the first (vLLM >= 0.32 takes it per request): one JSON chunk per token and
# page would be ~8,000 chunks a second at 128 pages, parsed beside the scheduler; the first token still
# comes at once, and a chunk costs a page at most this many tokens of streaming delay.
STREAM_INTERVAL = 16


class VllmUnavailable(DecoderDown):
    """The vLLM server is down, overloaded, or did not answer in time: retry later (503)."""


class VllmRefused(DecoderRefused):
    """The vLLM server answered this page with an error of its own (502): a deployment problem
    (flags, model) more often than the client's."""


def check_options(positions: Positions, guard: NGramGuard) -> None:
    """ValueError for what the vLLM decoder cannot honour (the front doors make it a 422)."""
    if positions is Positions.original:
        raise ValueError(
            "positions=original cannot be decoded by vLLM, which numbers positions contiguously; "
            "use positions=compact (the default with RTPRUNE_DECODER=vllm)"
        )
    if guard.size == 1:
        raise ValueError("ngram_size=1 is not supported by vLLM's n-gram processor (it bans nothing); use 0 or >= 2")


def encode_embeds(embeds: torch.Tensor) -> str:
    """The prompt as vLLM reads it: base64 of a ``torch.save``d (L, hidden) tensor."""
    buffer = io.BytesIO()
    torch.save(embeds.detach().to("cpu").contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def guard_fields(guard: NGramGuard) -> dict[str, Any]:
    """``vllm_xargs`` for DeepSeek-OCR's ``NGramPerReqLogitsProcessor``; none when the guard is off."""
    if guard.size == 0:
        return {}
    fields = {"ngram_size": guard.size, "window_size": guard.window, "whitelist_token_ids": sorted(guard.whitelist)}
    return {"vllm_xargs": fields}


class VllmServer:
    """Where the decoding happens: a vLLM OpenAI-compatible server, and one event-loop thread that
    carries every page's stream to it."""

    def __init__(self, url: str, *, timeout_s: float = 120.0, connect_timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.timeout_s = timeout_s
        self.model: str | None = None
        self.max_model_len: int | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-streams", daemon=True)
        self._thread.start()
        self._client: httpx.AsyncClient = self._call(self._make_client()).result()

    async def _make_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=self.timeout, limits=httpx.Limits(max_connections=None))

    def _call(self, coroutine: Coroutine) -> Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def connect(self, wait_s: float | None = None, poll_s: float = 2.0) -> None:
        """Learn the served model and its context length from ``/v1/models``; wait for the server to come
        up (it may start after us), forever unless ``wait_s`` is given (then VllmUnavailable)."""
        deadline = None if wait_s is None else time.monotonic() + wait_s
        last_report = 0.0
        while True:
            try:
                response = httpx.get(f"{self.url}/v1/models", timeout=self.timeout)
                response.raise_for_status()
                served = response.json()["data"][0]
                self.model, self.max_model_len = served["id"], served.get("max_model_len")
                log.info("decoding on vLLM at %s: model %s, %s positions", self.url, self.model, self.max_model_len)
                return
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
                if deadline is not None and time.monotonic() > deadline:
                    raise VllmUnavailable(f"no vLLM server answers at {self.url}: {exc}") from None
                if time.monotonic() - last_report > 30:
                    log.warning("waiting for the vLLM server at %s: %s", self.url, exc)
                    last_report = time.monotonic()
                time.sleep(poll_s)

    def new_batch(self, model: OcrModel) -> VllmBatch:
        if self.model is None:
            self.connect()
        return VllmBatch(self, model)

    def request_body(self, seq: Sequence, max_tokens: int) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt_embeds": encode_embeds(seq.prompt.embeds),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "return_token_ids": True,
            "skip_special_tokens": False,
            "stream_interval": STREAM_INTERVAL,
            **guard_fields(seq.guard),
        }

    def start_stream(self, body: dict[str, Any], events: queue.SimpleQueue, key: int) -> Future:
        return self._call(self._stream(body, events, key))

    async def _stream(self, body: dict[str, Any], events: queue.SimpleQueue, key: int) -> None:
        """Post one page and put ``(key, token ids, finish reason, time)`` per chunk on ``events``;
        ``(key, exception, None, time)`` if it fails. Runs on the event-loop thread."""
        finished = False
        try:
            async with self._client.stream("POST", f"{self.url}/v1/completions", json=body) as response:
                if response.status_code != 200:
                    raise answer_error(response.status_code, (await response.aread()).decode(errors="replace"))
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line.removeprefix("data: "))
                    if "error" in chunk:  # an error after the stream began; its code is a status when it is a number
                        code = chunk["error"].get("code")
                        raise answer_error(code if isinstance(code, int) else 500, json.dumps(chunk["error"]))
                    choice = chunk["choices"][0]
                    finished = choice.get("finish_reason") is not None
                    events.put((key, choice.get("token_ids") or [], choice.get("finish_reason"), time.perf_counter()))
            if not finished:
                raise VllmUnavailable("the vLLM stream ended before the page finished")
        except asyncio.CancelledError:
            raise
        except httpx.TimeoutException:
            error = VllmUnavailable(f"the vLLM server at {self.url} sent nothing for {self.timeout_s:g} s")
            events.put((key, error, None, time.perf_counter()))
        except httpx.HTTPError as exc:
            events.put((key, VllmUnavailable(f"cannot reach the vLLM server at {self.url}: {exc}"), None, 0.0))
        except (VllmUnavailable, VllmRefused) as exc:
            events.put((key, exc, None, time.perf_counter()))
        except Exception as exc:  # a body we cannot read, or anything else: the page must hear of it, not hang
            events.put((key, VllmRefused(f"unreadable answer from the vLLM server: {exc!r}"), None, 0.0))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._client.aclose()).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)


def answer_error(status: int, text: str) -> Exception:
    """503/429/5xx: the server is busy or broken (retry later); any other status: it refused the page."""
    detail = text.strip()[:300]
    if status in (429, 503) or status >= 500:
        return VllmUnavailable(f"the vLLM server answered {status}: {detail}")
    return VllmRefused(f"the vLLM server refused the page ({status}): {detail}")


class VllmBatch:
    """Pages decoding on a vLLM server, with :class:`~.batch.RunningBatch`'s interface."""

    def __init__(self, server: VllmServer, model: OcrModel) -> None:
        self.server, self.model = server, model
        self.rows: list[Sequence] = []
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, Future] = {}
        self._joined_at: dict[int, float] = {}
        self._first_at: dict[int, float] = {}

    @property
    def tokens_in_use(self) -> int:
        """Tokens vLLM holds for these pages (its paged KV cache has no padding)."""
        return sum(seq.prompt.length + len(seq.tokens) for seq in self.rows)

    def footprint_with(self, prompt_lengths: list[int]) -> int:
        """Always 0: vLLM budgets its own KV cache and queues what does not fit; only the row cap applies."""
        return 0

    def join(self, joiners: list[Sequence]) -> list[Sequence]:
        """Start every joiner's stream; return those that cannot run there (they do not stay)."""
        positions = min(self.model.max_positions, self.server.max_model_len or self.model.max_positions)
        refused = []
        for seq in joiners:
            seq.budget = min(seq.budget, positions - seq.prompt.next_position)
            assert seq.budget >= 1, "the engine checks that a prompt leaves room to generate (vLLM's length too)"
            if seq.prompt.next_position != seq.prompt.length:  # gapped (original) positions: vLLM would renumber
                seq.outcome = ValueError("vLLM decodes compact positions only; this prompt has original positions")
                refused.append(seq)
                continue
            key = id(seq)
            self._joined_at[key] = time.perf_counter()
            body = self.server.request_body(seq, seq.budget - len(seq.tokens))
            if seq.tokens:  # rejoining after an eviction: go on from the tokens it already has
                ids = torch.tensor(seq.tokens, device=self.model.device)
                body["prompt_embeds"] = encode_embeds(extend_prompt(seq.prompt, self.model.embed(ids)).embeds)
            self._streams[key] = self.server.start_stream(body, self._events, key)
            self.rows.append(seq)
        return refused

    def step(self) -> list[Sequence]:
        """Apply every event the streams delivered (waiting up to STEP_WAIT_S for one); return the rows
        that finished or failed (and left)."""
        if not self.rows:
            return []
        events = []
        with contextlib.suppress(queue.Empty):
            events.append(self._events.get(timeout=STEP_WAIT_S))
            while True:
                events.append(self._events.get_nowait())
        by_key = {id(seq): seq for seq in self.rows}
        finished: list[Sequence] = []
        for key, payload, reason, at in events:
            seq = by_key.get(key)
            if seq is None or seq.outcome is not None:  # removed meanwhile, or already settled
                continue
            if isinstance(payload, BaseException):
                seq.outcome = payload
            else:
                self._record(seq, key, payload, reason, at)
            if seq.outcome is not None:
                finished.append(seq)
        self.remove(finished)
        return finished

    def _record(self, seq: Sequence, key: int, ids: list[int], reason: str | None, at: float) -> None:
        if key not in self._first_at and (ids or reason):
            self._first_at[key] = at
            seq.timer.add_interval("prefill", self._joined_at[key], at)
        if reason == "stop" and ids and ids[-1] == EOS_ID:
            ids = ids[:-1]  # vLLM returns the end-of-text token; our sequences never hold it
        for token in ids[: max(0, seq.budget - len(seq.tokens))]:
            seq.add(token)
        if reason is not None:
            seq.timer.add_interval("decode", self._first_at[key], at)
            seq.outcome = Generation(seq.tokens, "length" if reason == "length" else "eos")

    def remove(self, leaving: list[Sequence]) -> None:
        """Drop rows; a stream still running is cancelled (closing it aborts the request in vLLM)."""
        gone = {id(seq) for seq in leaving}
        if not gone:
            return
        self.rows = [seq for seq in self.rows if id(seq) not in gone]
        for key in gone:
            stream = self._streams.pop(key, None)
            if stream is not None and not stream.done():
                stream.cancel()
            self._joined_at.pop(key, None)
            self._first_at.pop(key, None)
