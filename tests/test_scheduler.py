"""The serving core: continuous batching, page-level admission, failure isolation, shutdown, PDF safety."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from service.api.app import create_app
from service.engine import Cancelled, OcrOptions
from service.engine.decode.batch import RunningBatch
from service.engine.page import PageTask
from service.engine.stats import StageTimer
from service.errors import NotReady, OutOfMemory, Overloaded
from service.failures import to_service_error
from service.inputs import Document, open_document
from service.scheduler import PageQueue, PageRequest
from service.settings import ServiceSettings
from tests.helpers import (
    GatedEngine,
    RecordingEngine,
    image_request,
    live_server,
    started_scheduler,
    text_page,
    text_pdf,
)

LONG = OcrOptions(mode="tiny", max_new_tokens=400, ngram_size=0)
SHORT = [
    (text_page((600, 800)), OcrOptions(mode="tiny", pruner="rtprune", retention=0.5, max_new_tokens=6)),
    (text_page((700, 700)), OcrOptions(mode="base", pruner="norm", retention=0.7, max_new_tokens=5)),
    (text_page((500, 400)), OcrOptions(mode="tiny", pruner="none", positions="compact", max_new_tokens=7)),
    (text_page((900, 700)), OcrOptions(mode="small", pruner="divprune", retention=0.6, max_new_tokens=4)),
]


def wait_until(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def pdf_request(n_pages: int, options: OcrOptions, timeout: float = 120.0) -> PageRequest:
    return PageRequest(open_document(text_pdf(n_pages, lines=4)), options, deadline=time.monotonic() + timeout)


# --- the fair page queue ---------------------------------------------------------------------------


def test_pages_are_served_round_robin_by_request():
    queue = PageQueue(capacity=100)
    big = PageRequest(Document(list(range(1, 51))), OcrOptions(), deadline=time.monotonic() + 60)
    small = PageRequest(Document([1]), OcrOptions(), deadline=time.monotonic() + 60)
    other = PageRequest(Document([1, 2]), OcrOptions(), deadline=time.monotonic() + 60)
    for job in (big, small, other):
        queue.put(job, retry_after_s=1)
    assert queue.pages == 53
    order = [queue.take() for _ in range(6)]
    assert [(job is big, job is small, job is other, i) for job, i in order[:4]] == [
        (True, False, False, 0),
        (False, True, False, 0),  # the single image waits for one page of the 50-page PDF, not fifty
        (False, False, True, 0),
        (True, False, False, 1),
    ]
    assert order[4] == (other, 1) and order[5] == (big, 2) and queue.pages == 47


def test_a_document_that_does_not_fit_the_page_budget_is_refused_whole():
    queue = PageQueue(capacity=5)
    queue.put(PageRequest(Document([1, 2, 3]), OcrOptions(), deadline=time.monotonic() + 60), retry_after_s=7)
    with pytest.raises(Overloaded) as refused:
        queue.put(PageRequest(Document([1, 2, 3]), OcrOptions(), deadline=time.monotonic() + 60), retry_after_s=7)
    assert refused.value.headers == {"Retry-After": "7"} and "only 2 of 5 page slots" in refused.value.message
    assert queue.pages == 3  # nothing of the refused document was queued


def test_http_page_budget_and_full_queue_use_the_retry_after_setting(tiny_engine):
    engine = GatedEngine(tiny_engine)
    settings = ServiceSettings(
        model="tiny", log_json=False, queue_size=4, max_pdf_pages=4, retry_after_s=7, warmup=False
    )
    app = create_app(settings, load_engine=lambda: engine)
    fast = {"mode": "tiny", "max_new_tokens": "2"}

    def post_in_background(files) -> threading.Thread:
        thread = threading.Thread(
            target=httpx.post, args=(f"{base}/v1/ocr",), kwargs={"files": files, "data": fast, "timeout": 60}
        )
        thread.start()
        return thread

    with live_server(app) as base:
        engine.gate.clear()
        held = post_in_background({"file": ("p.png", png(text_page()), "image/png")})
        wait_until(lambda: engine.started.is_set(), what="the first page to be admitted")
        waiting = post_in_background({"file": ("d.pdf", text_pdf(2, lines=3), "application/pdf")})
        wait_until(lambda: app.state.scheduler.queued_pages == 2, what="two pages waiting")
        pdf = {"file": ("d.pdf", text_pdf(3, lines=3), "application/pdf")}
        too_big = httpx.post(f"{base}/v1/ocr", files=pdf, data={"mode": "tiny"}, timeout=30)
        assert too_big.status_code == 503 and too_big.headers["retry-after"] == "7"
        assert "only 2 of 4 page slots" in too_big.json()["error"]["message"]
        # fill the queue, then an upload is refused before its body is read
        filler = post_in_background({"file": ("d.pdf", text_pdf(2, lines=3), "application/pdf")})
        wait_until(lambda: app.state.scheduler.queue_full(), what="a full queue")
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(
                b"POST /v1/ocr HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 50000000\r\n\r\n"  # promises 50 MB and sends none of it
            )
            answer = conn.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 503") and "retry-after: 7" in answer.lower()
        engine.gate.set()
        for thread in (held, waiting, filler):
            thread.join(60)


# --- continuous batching -------------------------------------------------------------------------------


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_short_page_joins_a_running_long_one(tiny_engine, batching):
    steps: list[int] = []
    scheduler = started_scheduler(RecordingEngine(tiny_engine, steps), batching=batching, batch_wait_ms=0)
    try:
        long_job = image_request(text_page(), LONG)
        scheduler.submit(long_job)
        wait_until(lambda: len(steps) >= 5, what="the long page to be decoding")
        image, options = SHORT[0]
        short_job = image_request(image, options)
        scheduler.submit(short_job)
        short = short_job.future.result(timeout=120)[0]
        assert short.text == tiny_engine.run(image, options).text  # joined mid-decode, same text as alone
        if batching == "continuous":
            assert not long_job.future.done(), "the short page should not wait for the long one"
            assert max(steps) == 2
        else:
            assert long_job.future.done(), "static batches run to their end before new pages start"
            assert max(steps) == 1
        long_job.future.result(timeout=120)
    finally:
        scheduler.stop()


def test_the_kv_budget_bounds_pages_running_together(tiny_engine):
    steps: list[int] = []
    prompts = [page.prompt_tokens for page in tiny_engine.prepare([PageTask(*SHORT[i], StageTimer()) for i in (0, 2)])]
    budget = 2 * (max(prompts) + 8)  # room for two of these pages (rows x longest row), not three
    scheduler = started_scheduler(RecordingEngine(tiny_engine, steps), max_batch_tokens=budget, batch_wait_ms=200)
    try:
        items = [SHORT[0], SHORT[2], SHORT[0], SHORT[2]]
        jobs = [image_request(image, options) for image, options in items]
        for job in jobs:
            scheduler.submit(job)
        for job, (image, options) in zip(jobs, items, strict=True):
            assert job.future.result(timeout=120)[0].text == tiny_engine.run(image, options).text
        assert max(steps) == 2
    finally:
        scheduler.stop()


def test_prefill_tokens_per_step_are_capped(tiny_engine):
    """A 4-page document is admitted page by page when the cap is one page's visual tokens (with the join budget
    off: on, pages are prepared a piece at a time anyway)."""
    steps: list[int] = []
    scheduler = started_scheduler(
        RecordingEngine(tiny_engine, steps), max_prefill_tokens=73, batch_wait_ms=0, join_budget_ms=0
    )
    prepared: list[int] = []
    original = tiny_engine.prepare
    try:
        tiny_engine.prepare = lambda tasks: (prepared.append(len(tasks)), original(tasks))[1]
        job = pdf_request(4, OcrOptions(mode="tiny", max_new_tokens=8, ngram_size=0))
        scheduler.submit(job)
        assert len(job.future.result(timeout=120)) == 4
        assert prepared == [1, 1, 1, 1] and max(steps) > 1  # one page per step, yet they decoded together
    finally:
        del tiny_engine.prepare
        scheduler.stop()


# --- failure isolation ----------------------------------------------------------------------------------


class FaultyEngine(RecordingEngine):
    """Steps with more than ``max_rows`` pages, or with a page whose budget is ``poison``, run out of memory."""

    def __init__(self, engine, *, max_rows: int, poison: int | None = None) -> None:
        super().__init__(engine, [])
        self.max_rows, self.poison, self.faults = max_rows, poison, 0

    def new_batch(self):
        outer = self

        class FaultyBatch(RunningBatch):
            def step(self):
                if len(self.rows) > outer.max_rows or any(seq.budget == outer.poison for seq in self.rows):
                    outer.faults += 1
                    raise torch.OutOfMemoryError("CUDA out of memory (injected)")
                return super().step()

        return FaultyBatch(self.engine.model)


def test_out_of_memory_is_retried_with_fewer_pages(tiny_engine):
    faulty = FaultyEngine(tiny_engine, max_rows=2)
    scheduler = started_scheduler(faulty, batch_wait_ms=300)
    try:
        jobs = [image_request(image, options) for image, options in SHORT]
        for job in jobs:
            scheduler.submit(job)
        for job, (image, options) in zip(jobs, SHORT, strict=True):
            assert job.future.result(timeout=120)[0].text == tiny_engine.run(image, options).text
        assert faulty.faults >= 1
    finally:
        scheduler.stop()


def test_a_page_that_runs_out_of_memory_alone_fails_its_request_only(tiny_engine):
    scheduler = started_scheduler(FaultyEngine(tiny_engine, max_rows=8, poison=13), batch_wait_ms=300)
    try:
        poisoned = image_request(text_page(), OcrOptions(mode="tiny", max_new_tokens=13))
        jobs = [image_request(image, options) for image, options in SHORT[:3]]
        for job in [jobs[0], poisoned, *jobs[1:]]:
            scheduler.submit(job)
        with pytest.raises(torch.OutOfMemoryError) as failed:
            poisoned.future.result(timeout=120)
        answer = to_service_error(failed.value, retry_after_s=2)  # what every door answers for it
        assert isinstance(answer, OutOfMemory) and answer.status == 503 and answer.headers["Retry-After"]
        for job, (image, options) in zip(jobs, SHORT, strict=False):
            assert job.future.result(timeout=120)[0].text == tiny_engine.run(image, options).text
    finally:
        scheduler.stop()


def test_a_prefill_that_fails_is_retried_in_halves_until_the_bad_page_fails_alone(tiny_engine):
    class BadPrefill(RecordingEngine):
        def new_batch(self):
            class Batch(RunningBatch):
                def join(self, joiners):
                    if any(seq.budget == 13 for seq in joiners):
                        raise RuntimeError("prefill failed on a corrupt page")
                    return super().join(joiners)

            return Batch(self.engine.model)

    scheduler = started_scheduler(BadPrefill(tiny_engine, []), batch_wait_ms=300)
    try:
        bad = image_request(text_page(), OcrOptions(mode="tiny", max_new_tokens=13))
        jobs = [image_request(image, options) for image, options in SHORT]
        for job in [*jobs[:2], bad, *jobs[2:]]:
            scheduler.submit(job)
        with pytest.raises(RuntimeError, match="corrupt page"):
            bad.future.result(timeout=120)
        for job, (image, options) in zip(jobs, SHORT, strict=True):
            assert job.future.result(timeout=120)[0].text == tiny_engine.run(image, options).text
    finally:
        scheduler.stop()


def test_a_step_that_fails_half_way_leaves_the_cache_as_it_was(tiny_engine):
    pages = tiny_engine.prepare([PageTask(*item, StageTimer()) for item in SHORT[:2]])
    batch = tiny_engine.new_batch()
    batch.join([page.sequence for page in pages])
    batch.step()
    layer = tiny_engine.model.model.model.language_model.layers[1]

    def fail_once(module, args):
        handle.remove()
        raise torch.OutOfMemoryError("injected after layer 0 appended its column")

    handle = layer.register_forward_pre_hook(fail_once)
    width, lengths = batch.width, list(batch._cache.lengths)
    with pytest.raises(torch.OutOfMemoryError):
        batch.step()
    assert batch.width == width and batch._cache.lengths == lengths  # the half-written column does not count
    while batch.rows:
        batch.step()
    for page, item in zip(pages, SHORT[:2], strict=True):
        assert tiny_engine.finish(page).text == tiny_engine.run(*item).text


def test_a_vision_failure_fails_its_page_only(tiny_engine, monkeypatch):
    original = tiny_engine.model.encode

    def encode(pages):
        if any(page.size == (500, 400) for page in pages):
            raise RuntimeError("vision tower failed on this page")
        return original(pages)

    monkeypatch.setattr(tiny_engine.model, "encode", encode)
    items = [SHORT[0], (text_page((500, 400)), OcrOptions(mode="tiny", max_new_tokens=5)), SHORT[2]]
    results = tiny_engine.run_batch([PageTask(*item, StageTimer()) for item in items])
    assert isinstance(results[1], RuntimeError)
    monkeypatch.setattr(tiny_engine.model, "encode", original)
    assert results[0].text == tiny_engine.run(*SHORT[0]).text


def test_a_cancelled_request_frees_its_queued_pages_at_once(tiny_engine):
    engine = GatedEngine(tiny_engine)
    scheduler = started_scheduler(engine, batch_wait_ms=0, max_batch_size=1)
    try:
        engine.gate.clear()
        job = pdf_request(5, OcrOptions(mode="tiny", max_new_tokens=2))
        scheduler.submit(job)
        wait_until(lambda: engine.started.is_set(), what="the first page")
        # the four pages not started wait in the queue or, a few ahead, on the preprocessing threads
        assert scheduler.queued_pages + scheduler.running_pages == 4
        job.cancel.set()
        wait_until(
            lambda: scheduler.queued_pages == scheduler.running_pages == 0,
            timeout=2,
            what="the queued pages to be dropped",
        )
        with pytest.raises(Cancelled):
            job.future.result(timeout=5)
    finally:
        engine.gate.set()
        scheduler.stop()


# --- shutdown -------------------------------------------------------------------------------------------


def test_shutdown_finishes_running_pages_and_refuses_the_rest(tiny_engine):
    steps: list[int] = []
    scheduler = started_scheduler(RecordingEngine(tiny_engine, steps), max_batch_size=1, batch_wait_ms=0)
    running = image_request(*SHORT[0])
    waiting = image_request(*SHORT[2])
    scheduler.submit(running)
    wait_until(lambda: scheduler.batch_tokens > 0, what="one page running")
    scheduler.submit(waiting)  # not started: in the queue, or on a preprocessing thread
    started = time.monotonic()
    scheduler.begin_shutdown(grace_s=30)
    with pytest.raises(NotReady):
        waiting.future.result(timeout=1)  # at once
    assert running.future.result(timeout=60)[0].text == tiny_engine.run(*SHORT[0]).text
    with pytest.raises(NotReady):
        scheduler.submit(image_request(*SHORT[1]))
    scheduler.stop(timeout=10)
    assert scheduler.state == "stopped" and time.monotonic() - started < 30


def test_shutdown_grace_ends_a_page_that_would_run_for_ever(tiny_engine):
    scheduler = started_scheduler(tiny_engine, batch_wait_ms=0)
    job = image_request(text_page(), OcrOptions(mode="tiny", max_new_tokens=8192, ngram_size=0))
    scheduler.submit(job)
    wait_until(lambda: scheduler.batch_tokens > 0, what="decoding")
    started = time.monotonic()
    scheduler.begin_shutdown(grace_s=0.5)
    with pytest.raises(NotReady, match="grace period"):
        job.future.result(timeout=10)
    scheduler.stop(timeout=10)
    assert time.monotonic() - started < 5


# --- PDFs -------------------------------------------------------------------------------------------------


def test_concurrent_pdf_renders_equal_a_solo_render():
    data = text_pdf(3)
    solo = [page.tobytes() for page in open_document(data).pages()]

    def render_all(_):
        return [page.tobytes() for page in open_document(data).pages()]

    with ThreadPoolExecutor(16) as pool:
        renders = list(pool.map(render_all, range(32)))
    assert all(render == solo for render in renders)


def test_sixteen_concurrent_pdf_uploads_are_all_served(tiny_engine):
    settings = ServiceSettings(model="tiny", log_json=False, warmup=False)
    app = create_app(settings, load_engine=lambda: tiny_engine)
    files = {"file": ("doc.pdf", text_pdf(3), "application/pdf")}
    with live_server(app) as base:

        def upload(_):
            return httpx.post(f"{base}/v1/ocr", files=files, data={"mode": "tiny", "max_new_tokens": "1"}, timeout=120)

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(upload, range(16)))
        assert [r.status_code for r in responses] == [200] * 16
        assert all([p["page"] for p in r.json()["pages"]] == [1, 2, 3] for r in responses)
        assert httpx.get(f"{base}/healthz").status_code == 200


# --- limits and metrics -----------------------------------------------------------------------------------


def test_a_prompt_longer_than_the_model_positions_is_422_before_any_work(tiny_engine, monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.setattr(tiny_engine.model, "max_positions", 60)
    encoded = []
    monkeypatch.setattr(tiny_engine.model, "encode", lambda pages: encoded.append(pages) or [])
    app = create_app(ServiceSettings(model="tiny", log_json=False, warmup=False), load_engine=lambda: tiny_engine)
    with TestClient(app) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, what="ready")
        response = client.post("/v1/ocr", files={"file": ("p.png", png(text_page()))}, data={"mode": "tiny"})
    assert response.status_code == 422 and "positions" in response.json()["error"]["message"]
    assert encoded == []  # refused before the vision encoder ran


def test_metrics_show_running_pages_batch_tokens_queued_pages_and_steps(tiny_engine):
    from fastapi.testclient import TestClient

    app = create_app(ServiceSettings(model="tiny", log_json=False, warmup=False), load_engine=lambda: tiny_engine)
    with TestClient(app) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, what="ready")
        files = {"file": ("p.png", png(text_page()))}
        done = threading.Thread(
            target=client.post, args=("/v1/ocr",), kwargs={"files": files, "data": {"mode": "tiny", "ngram_size": "0"}}
        )
        done.start()
        wait_until(lambda: app.state.scheduler.steps_per_s() > 0, what="decoding")
        text = client.get("/metrics").text
        app.state.scheduler.stop()  # ends the 8192-token page
        done.join(30)
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line[:1] != "#"}
    assert values["rtprune_running_pages"] == 1 and values["rtprune_batch_tokens"] > 0
    assert values["rtprune_queue_depth"] == 0 and values["rtprune_decode_steps_total"] > 0
    assert values["rtprune_decode_steps_per_second"] > 0 and values["rtprune_batch_tokens_limit"] == 32768
    assert [values[f'rtprune_queued_pages{{priority="{p}"}}'] for p in ("interactive", "batch")] == [0, 0]


def test_info_describes_the_batching(tiny_engine):
    from fastapi.testclient import TestClient

    settings = ServiceSettings(model="tiny", log_json=False, warmup=False, max_batch_tokens=4096, batching="static")
    app = create_app(settings, load_engine=lambda: tiny_engine)
    with TestClient(app) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, what="ready")
        batching = client.get("/v1/info").json()["batching"]
    assert batching == {
        "mode": "static",
        "max_batch_size": 32,
        "max_batch_tokens": 4096,
        "max_prefill_tokens": 8192,
        "batch_wait_ms": 5.0,
        "join_budget": "off",  # static batching never joins a running batch
        "join_budget_ms": 0.0,
        "prefill_chunk_tokens": 512,
    }


# --- helpers ------------------------------------------------------------------------------------------------


def png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_prepared_page_holds_no_pixels_unless_its_token_map_needs_them(tiny_engine):
    plain, mapped = tiny_engine.prepare(
        [
            PageTask(text_page(), OcrOptions(mode="gundam"), StageTimer()),
            PageTask(text_page(), OcrOptions(token_map=True), StageTimer()),
        ]
    )
    assert plain.task.image is None and plain.block.global_view.numel() == 0 and plain.block.page.tiles is None
    assert plain.block.page.size == (1100, 800)  # what the boxes need stays
    assert mapped.task.image is not None and mapped.block.global_view.numel() > 0


def test_rendering_and_preprocessing_never_run_on_the_schedulers_thread(tiny_engine, monkeypatch):
    """The thread that drives the model only launches model work: PDF pages are rendered, resized and
    tokenized on the preprocessing threads, ahead of admission."""
    import service.engine.engine as engine_module
    import service.inputs as inputs_module

    threads: list[str] = []

    def spy(function):
        def called(*args, **kwargs):
            threads.append(threading.current_thread().name)
            return function(*args, **kwargs)

        return called

    monkeypatch.setattr(engine_module, "preprocess", spy(engine_module.preprocess))
    monkeypatch.setattr(engine_module, "tokenize_prompt", spy(engine_module.tokenize_prompt))
    monkeypatch.setattr(inputs_module, "render_pdf_page", spy(inputs_module.render_pdf_page))
    scheduler = started_scheduler(tiny_engine, batch_wait_ms=0)
    try:
        request = pdf_request(3, OcrOptions(mode="tiny", max_new_tokens=3))
        scheduler.submit(request)
        assert len(request.future.result(timeout=120)) == 3
    finally:
        scheduler.stop()
    assert len(threads) == 3 * 3  # render, preprocess, tokenize: each page once
    assert all(name.startswith("rtprune-preprocess") for name in threads), threads
