"""What several test modules build: pages, PDFs, servers in a thread or a process, and test doubles of
the engine around the real tiny one. Fixtures live in ``conftest.py``; tests import these."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from service.loadtest import free_port, wait_ready
from service.settings import ServiceSettings


def v1_block_masks(rows: int, cols: int, with_separator: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """protected/newline masks of a v1 block: `rows` rows of `cols` grid tokens + newline, then a separator."""
    newline = torch.zeros(rows, cols + 1, dtype=torch.bool)
    newline[:, -1] = True
    newline = newline.flatten()
    if with_separator:
        newline = torch.cat([newline, torch.zeros(1, dtype=torch.bool)])
    protected = newline.clone()
    if with_separator:
        protected[-1] = True
    return protected, newline


def text_page(size: tuple[int, int] = (1100, 800), lines: int = 20) -> Image.Image:
    """A white page with lines of black text, the shape of a real document scan."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    step = max(12, size[1] // (lines + 2))
    for i in range(lines):
        draw.text((40, step * (i + 1)), f"Line {i}: the quick brown fox jumps over the lazy dog.", fill="black")
    return image


@contextmanager
def live_server(app, timeout: float = 60.0):
    """Serve ``app`` with a real uvicorn on a free loopback port until the block ends; yields the base URL."""
    import uvicorn  # a server dependency, imported only by the tests that start one

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=timeout)
        yield base
    finally:
        server.should_exit = True
        thread.join(10)


class RecordingEngine:
    """The real engine, recording how many pages each decode step of the scheduler's batch ran."""

    def __init__(self, engine, rows_per_step: list[int]) -> None:
        self.engine, self.rows_per_step = engine, rows_per_step

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def new_batch(self):
        from service.engine.decode.batch import RunningBatch

        log = self.rows_per_step

        class RecordingBatch(RunningBatch):
            def step(self):
                log.append(len(self.rows))
                return super().step()

        return RecordingBatch(self.engine.model)


class GatedEngine:
    """The real tiny engine behind a gate: each run waits until the test opens it (or fails on demand)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.gate = threading.Event()
        self.started = threading.Event()
        self.fail_next: BaseException | None = None
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def warmup(self) -> None:
        self.engine.warmup()

    def prepare(self, tasks):
        self.started.set()
        while not self.gate.wait(0.01):
            if all(task.should_stop() for task in tasks):
                break
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        return self.engine.prepare(tasks)


def started_scheduler(engine, on_fatal=None, **config):
    """A scheduler over ``engine`` (no warm-up), already ready."""
    from service.scheduler import Scheduler, SchedulerConfig

    scheduler = Scheduler(lambda: engine, SchedulerConfig(**{"warmup": False, **config}), on_fatal=on_fatal)
    scheduler.start()
    deadline = time.monotonic() + 30
    while scheduler.state != "ready":
        assert scheduler.state == "loading" and time.monotonic() < deadline, scheduler.error
        time.sleep(0.01)
    return scheduler


def image_request(image, options, *, timeout: float = 120.0, **kwargs):
    """A scheduler job of one image page."""
    from service.inputs import Document
    from service.scheduler import PageRequest

    return PageRequest(Document([1], _images=[image]), options, deadline=time.monotonic() + timeout, **kwargs)


def text_pdf(n_pages: int, lines: int = 30, size: tuple[int, int] = (612, 792), claimed: int | None = None) -> bytes:
    """A PDF of real text (Helvetica, a standard Type 1 font), the kind PDFium must lay out glyph by glyph.
    ``size`` is the page box in points; ``claimed`` a page count for the page tree that may lie."""
    objects: list[bytes] = []
    page_ids = [3 + 2 * i for i in range(n_pages)]
    font_id = 3 + 2 * n_pages
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    kids = " ".join(f"{i} 0 R" for i in page_ids)
    count = n_pages if claimed is None else claimed
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {count} >>".encode())
    for p in range(n_pages):
        text = "".join(
            f"BT /F1 11 Tf 50 {760 - 24 * i} Td (Page {p + 1} line {i}: The quick brown fox jumps over it.) Tj ET\n"
            for i in range(lines)
        ).encode()
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {size[0]} {size[1]}] /Contents {page_ids[p] + 1} 0 R "
            f"/Resources << /Font << /F1 {font_id} 0 R >> >> >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(text) + text + b"endstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@contextmanager
def serve_process(
    preset_cache, *args: str, log_path: Path | None = None, env: dict | None = None, launcher: Sequence[str] = ()
):
    """`rtprune-ocr serve` as a user starts it, in its own process on a free loopback port, until the block
    ends; yields (base URL, port, process). Its output goes to ``log_path`` (never an unread pipe).
    ``launcher`` goes before the command (it must exec it, so the process is the server's)."""
    port = free_port()
    environment = {**os.environ, "RTPRUNE_CACHE_DIR": str(preset_cache), **(env or {})}
    command = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    command = [*launcher, *command]
    with open(log_path or os.devnull, "w") as log:
        process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, process, timeout=120)
            yield base, port, process
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, dict]]:
    """(event name, JSON data) of a server-sent event stream's lines; comments and ids skipped."""
    event = "message"
    for line in lines:
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield event, json.loads(line.removeprefix("data: "))


def wait_until(condition: Callable[[], object], what: str, patience_s: float = 300.0, interval_s: float = 0.02) -> None:
    """Wait for ``condition``, checked every ``interval_s``; fail saying ``what`` did not happen. The patience
    is liveness (a busy machine may be slow), never a speed claim: speed is measured in bench/."""
    deadline = time.monotonic() + patience_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(interval_s)


def stopped_before_its_budget(app, budget: int = 8192) -> None:
    """The app's running pages ended, and fewer decode steps ran than one page's budget: the page was
    cancelled, not run to its end."""
    scheduler = app.state.scheduler
    wait_until(lambda: not scheduler.running_pages and not scheduler.queued_pages, "the pages kept running")
    steps = app.state.metrics.registry.get_sample_value("rtprune_decode_steps_total") or 0
    assert steps < budget, f"{steps} decode steps: the page ran to its budget instead of stopping"


def data_url(data: bytes, media_type: str) -> str:
    """``data`` as a base64 data URL, the way the JSON doors' clients send a document."""
    import base64

    return f"data:{media_type};base64," + base64.b64encode(data).decode()


GUNDAM_PAGE = (1700, 2200)  # a 2 x 3 tile grid and the global view: seven views


def joining_work_between_steps(engine, decoding_priority: str = "interactive", decoding_tokens: int = 200, **config):
    """Four pages decode while a Gundam page joins, on a scheduler over ``engine`` (its own decoder or vLLM's);
    returns the joining work done between consecutive decode steps (``tower``: the vision tower's forward,
    ``layer``: one SAM layer, ``chunk``: one prefill chunk), the Gundam page's result and the join budget the
    scheduler used."""
    from bench.pages import document_page
    from service.engine.decode.batch import RunningBatch
    from service.scheduler import Scheduler, SchedulerConfig

    events: list[str] = []
    tower = engine.model.model.model.vision_tower
    hooks = [tower.register_forward_pre_hook(lambda *_: events.append("tower"))]
    hooks += [layer.register_forward_pre_hook(lambda *_: events.append("layer")) for layer in tower.sam_encoder.layers]
    chunk = RunningBatch.prefill_chunk
    RunningBatch.prefill_chunk = lambda *a: (events.append("chunk"), chunk(*a))[1]
    scheduler = Scheduler(
        lambda: engine, SchedulerConfig(warmup=False, **config), on_step=lambda _: events.append("step")
    )
    scheduler.start()
    try:
        while scheduler.state == "loading":
            time.sleep(0.01)
        small = engine.resolve_options({"mode": "tiny", "max_new_tokens": decoding_tokens, "ngram_size": 0})[0]
        decoding = [image_request(document_page((640, 640), seed=i), small) for i in range(4)]
        for request in decoding:
            request.priority = decoding_priority
            scheduler.submit(request)
        while len(scheduler._batch.rows) < 4:  # all four decoding before the large page comes
            time.sleep(0.01)
        joined_at = len(events)
        gundam = engine.resolve_options({"mode": "gundam", "max_new_tokens": 4, "ngram_size": 0})[0]
        joiner = image_request(document_page(GUNDAM_PAGE, seed=9), gundam)
        scheduler.submit(joiner)
        result = joiner.future.result(timeout=300)[0]
        assert all(not r.future.done() for r in decoding), "the pages decoding must outlast the join"
        measured = scheduler.join_budget_ms
        for request in decoding:
            request.cancel.set()
    finally:
        scheduler.stop()
        RunningBatch.prefill_chunk = chunk
        for hook in hooks:
            hook.remove()
    segments: list[list[str]] = [[]]
    for event in events[joined_at:]:
        if event == "step":
            segments.append([])
        else:
            segments[-1].append(event)
    return segments, result, measured


# --- the in-process app, as the API tests drive it ------------------------------------------------------

FAST = {"mode": "tiny", "max_new_tokens": "4"}  # form fields: the smallest mode, a few tokens
JOB_PDF = text_pdf(3, lines=3)  # a three-page document for the jobs' tests


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def api_settings(**overrides) -> ServiceSettings:
    base = {"model": "tiny", "log_json": False, "queue_size": 4, "max_pdf_pages": 4, "request_timeout_s": 60}
    return ServiceSettings(**{**base, **overrides})


def wait_until_ready(client, timeout: float = 60.0) -> None:
    """Until an in-process app (a TestClient) answers /readyz 200."""
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "service did not become ready"
        time.sleep(0.05)


@contextmanager
def client_for(engine, **overrides):
    """The app on ``engine`` with the API tests' settings (and ``overrides``), ready: (client, app)."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    app = create_app(api_settings(**overrides), load_engine=lambda: engine)
    with TestClient(app) as client:
        wait_until_ready(client)
        yield client, app


def jobs_client(engine, jobs_dir: Path, **overrides):
    """The app on ``engine`` keeping its jobs under ``jobs_dir`` (not started: enter it with ``with``)."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    settings = ServiceSettings(model="tiny", log_json=False, warmup=False, jobs_dir=jobs_dir, **overrides)
    return TestClient(create_app(settings, load_engine=lambda: engine))


VLLM_SERVE_FLAGS = [  # the README's `vllm serve` flags for DeepSeek-OCR
    "--enable-prompt-embeds",
    "--limit-mm-per-prompt",
    '{"image":0}',
    "--no-enable-prefix-caching",
    "--logits_processors",
    "vllm.model_executor.models.deepseek_ocr:NGramPerReqLogitsProcessor",
]
