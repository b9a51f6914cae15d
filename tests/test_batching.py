"""Batching: a batch gives each request exactly what it would get alone, with its own stats."""

from __future__ import annotations

import asyncio
import io

import httpx
import pytest
from asgi_lifespan import LifespanManager

from service.api.app import create_app
from service.engine import Cancelled, OcrOptions
from service.engine.page import PageTask
from service.engine.stats import StageTimer
from service.settings import ServiceSettings
from tests.helpers import RecordingEngine, image_request, started_scheduler, text_page

MIXED = [  # modes, pruners, retentions, positions, budgets and guards all differ
    (text_page((600, 800)), OcrOptions(mode="tiny", pruner="rtprune", retention="auto", max_new_tokens=5)),
    (text_page((1100, 800)), OcrOptions(mode="large", pruner="norm", retention=0.7, max_new_tokens=12)),
    (text_page((1100, 800)), OcrOptions(mode="gundam", pruner="none", max_new_tokens=8, ngram_size=3, ngram_window=8)),
    (text_page((700, 700)), OcrOptions(mode="base", pruner="divprune", retention=0.5, max_new_tokens=3)),
    (
        text_page((500, 400)),
        OcrOptions(mode="tiny", pruner="random", retention=0.9, positions="compact", max_new_tokens=10, task="free"),
    ),
    (
        text_page((600, 800)),
        OcrOptions(mode="tiny", pruner="rtprune", retention=0.5, max_new_tokens=7, task="locate", ref="the title"),
    ),
]
SAME_STATS = ("visual_tokens", "visual_tokens_kept", "retention", "prompt_tokens", "output_tokens", "finish_reason")


def tasks(items):
    return [PageTask(image, options, StageTimer()) for image, options in items]


def test_mixed_batch_equals_running_each_alone(tiny_engine):
    alone = [tiny_engine.run(image, options) for image, options in MIXED]
    batched = tiny_engine.run_batch(tasks(MIXED))
    for solo, together in zip(alone, batched, strict=True):
        assert together.text == solo.text  # token for token
        assert together.boxes == solo.boxes
        for key in SAME_STATS:
            assert getattr(together.stats, key) == getattr(solo.stats, key), key
        # the vision encoder is not batch-invariant even in fp32 on a CPU (features differ in the last bits when
        # two pages share a call), so the dynamic ratio's terms agree to float32 precision, not to the bit
        asked, alone_asked = together.stats.retention_requested, solo.stats.retention_requested
        assert asked.value == alone_asked.value
        for term in ("dynamic", "r_sim", "r_txt"):
            expected = getattr(alone_asked, term)
            assert getattr(asked, term) == (expected if expected is None else pytest.approx(expected, rel=1e-5))
    # the batch really padded: prompts of different lengths went through one prefill
    assert len({r.stats.prompt_tokens for r in batched}) > 2


def test_one_bad_task_does_not_spoil_the_batch(tiny_engine):
    from PIL import Image

    truncated = _png(text_page())
    unreadable = Image.open(io.BytesIO(truncated[: len(truncated) // 2]))  # the header opens, the pixels fail
    items = [*MIXED[:2], (text_page(), OcrOptions(task="locate")), (unreadable, OcrOptions(mode="tiny"))]
    results = tiny_engine.run_batch(tasks(items))
    assert isinstance(results[2], ValueError)  # locate without ref
    assert isinstance(results[3], OSError)
    assert results[0].text == tiny_engine.run(*MIXED[0]).text


def test_cancelling_one_sequence_leaves_the_others(tiny_engine):
    calls = {"n": 0}

    def stop_soon():
        calls["n"] += 1
        return calls["n"] > 2

    items = [(text_page(), OcrOptions(mode="tiny", max_new_tokens=40, ngram_size=0)), MIXED[1], MIXED[4]]
    batch = tasks(items)
    batch[0].should_stop = stop_soon
    results = tiny_engine.run_batch(batch)
    assert isinstance(results[0], Cancelled)
    assert results[1].text == tiny_engine.run(*MIXED[1]).text
    assert results[2].text == tiny_engine.run(*MIXED[4]).text


def test_scheduler_batches_concurrent_jobs_and_keeps_deadlines_per_request(tiny_engine):
    steps: list[int] = []
    scheduler = started_scheduler(RecordingEngine(tiny_engine, steps), max_batch_size=4, batch_wait_ms=300)
    try:
        doomed = image_request(text_page(), OcrOptions(mode="tiny", max_new_tokens=8192, ngram_size=0), timeout=1.0)
        jobs = [doomed] + [image_request(image, options) for image, options in MIXED[:3]]
        for job in jobs:
            scheduler.submit(job)
        with pytest.raises(Cancelled):
            doomed.future.result(timeout=300)
        assert len(steps) < 8192  # stopped at its deadline, not after its 8192 tokens
        for job, (image, options) in zip(jobs[1:], MIXED[:3], strict=True):
            result = job.future.result(timeout=60)[0]
            assert result.text == tiny_engine.run(image, options).text
            assert result.stats.latency_ms.queue > 0
        assert max(steps) == 4  # the four jobs decoded together
    finally:
        scheduler.stop()


def test_batched_http_requests_match_their_solo_answers(tiny_engine):
    settings = ServiceSettings(model="tiny", log_json=False, max_batch_size=4, batch_wait_ms=300)
    sizes: list[int] = []

    forms = [
        {"mode": "tiny", "retention": "auto", "max_new_tokens": "6"},
        {"mode": "large", "pruner": "norm", "retention": "0.7", "max_new_tokens": "4"},
        {"mode": "gundam", "pruner": "none", "max_new_tokens": "5"},
        {"mode": "base", "pruner": "divprune", "retention": "0.5", "max_new_tokens": "3"},
    ]
    png = _png(text_page((900, 700)))

    async def scenario():
        app = create_app(settings, load_engine=lambda: RecordingEngine(tiny_engine, sizes))
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as client:
                while (await client.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.05)
                sizes.clear()
                together = await asyncio.gather(
                    *[client.post("/v1/ocr", files={"file": ("p.png", png)}, data=f) for f in forms]
                )
                alone = [await client.post("/v1/ocr", files={"file": ("p.png", png)}, data=f) for f in forms]
        return together, alone

    together, alone = asyncio.run(scenario())
    assert max(sizes) > 1, f"requests were not batched: {sizes}"
    for t, a in zip(together, alone, strict=True):
        assert t.status_code == a.status_code == 200
        batched_page, solo_page = t.json()["pages"][0], a.json()["pages"][0]
        assert batched_page["text"] == solo_page["text"]
        assert batched_page["stats"]["visual_tokens_kept"] == solo_page["stats"]["visual_tokens_kept"]


def test_batch_size_one_turns_batching_off(tiny_engine):
    steps: list[int] = []
    scheduler = started_scheduler(RecordingEngine(tiny_engine, steps), max_batch_size=1, batch_wait_ms=300)
    try:
        jobs = [image_request(image, options) for image, options in MIXED[:3]]
        for job in jobs:
            scheduler.submit(job)
        for job in jobs:
            job.future.result(timeout=60)
        assert steps and set(steps) == {1}
    finally:
        scheduler.stop()


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
