"""The app factory: settings in, FastAPI app out; the model loads in the lifespan."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from service import __version__
from service.api import chat, health, jobs, mistral_ocr, ocr, web
from service.api.doors import open_upload
from service.api.handlers import install_error_handlers
from service.api.middleware import (
    AdmissionMiddleware,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    ConcurrencyLimitMiddleware,
    JsonBodyMiddleware,
    RequestContextMiddleware,
)
from service.api.openapi import describe_uploads_as_multipart
from service.api.responses import JSONResponse
from service.api.shares import FetchShares, StreamLimits
from service.engine import OCREngine
from service.jobs import JobRunner, open_store
from service.jobs.webhooks import Webhooks
from service.metrics import Metrics
from service.scheduler import Scheduler
from service.settings import ServiceSettings

FETCH_THREADS = 8  # image fetches at once; more wait (each has its own deadline)
JSON_BESIDE_IMAGES_BYTES = 1 << 20  # a JSON body's fields other than data URLs, together (docs/limits.md)


def default_loader(settings: ServiceSettings) -> Callable[[], OCREngine]:
    return lambda: OCREngine.load(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        cache_dir=settings.cache_dir,
        vllm_url=settings.vllm_url if settings.decoder == "vllm" else None,
        vllm_timeout_s=settings.vllm_timeout_s,
        memory_fraction=settings.gpu_memory_fraction,
        max_vision_bytes=settings.max_vision_mb * 2**20,
    )


def job_runner(settings: ServiceSettings, scheduler: Scheduler, metrics: Metrics) -> JobRunner:
    """The job runner on the store the settings name: PostgreSQL (RTPRUNE_JOBS_URL) or SQLite."""
    url = settings.jobs_url.get_secret_value() if settings.jobs_url else None
    directory = settings.jobs_dir or Path.home() / ".cache" / "rtprune-ocr" / "jobs"
    store = open_store(url, directory, on_timing=metrics.observe_store)
    return JobRunner(
        store,
        scheduler,
        lambda data, page_range: open_upload(data, settings, page_range),
        retention_s=settings.job_retention_s,
        retry_after_s=settings.retry_after_s,
        concurrency=settings.jobs_concurrency,
        on_backlog=metrics.observe_backlog,
        webhooks=Webhooks(
            settings.allow_webhooks,
            settings.outbound_policy(),
            settings.webhook_secret.get_secret_value() if settings.webhook_secret else None,
        ),
    )


def create_app(
    settings: ServiceSettings | None = None,
    *,
    load_engine: Callable[[], OCREngine] | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """Build the service. ``load_engine`` replaces model loading (tests share one engine);
    ``on_fatal`` is called if loading fails (the server exits)."""
    settings = settings or ServiceSettings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler = Scheduler(
            load_engine or default_loader(settings),
            settings.scheduler_config(),
            on_page=lambda result, options: metrics.observe_page(result.stats, options),
            on_step=lambda rows: metrics.decode_steps.inc(),
            on_fatal=on_fatal,
        )
        app.state.scheduler = scheduler
        metrics.watch(scheduler)
        scheduler.start()  # loads in the scheduler's thread; /readyz says 503 until it is warm
        app.state.jobs = job_runner(settings, scheduler, metrics)
        resume = asyncio.create_task(app.state.jobs.start())  # unfinished jobs go on once the model is ready
        try:
            yield
        finally:
            resume.cancel()
            await app.state.jobs.stop()  # stored state untouched: the next start resumes
            await run_in_threadpool(scheduler.stop)
            await run_in_threadpool(app.state.jobs.store.close)
            app.state.fetch_pool.shutdown(wait=False, cancel_futures=True)
            app.state.jobs.webhooks.close()

    # /docs and /redoc from assets in the fastapi-offline package: FastAPI's default pages load them
    # from a CDN and stay blank on an offline or air-gapped host, the kind that often runs a GPU service
    app = FastAPIOffline(
        title="rtprune-ocr",
        version=__version__,
        summary="DeepSeek-OCR with RTPrune visual-token pruning",
        lifespan=lifespan,
        static_url="/static/docs",
        default_response_class=JSONResponse,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.started_at = int(time.time())  # the model card's `created`
    app.state.streams = StreamLimits(
        total=settings.max_streams, per_client=settings.max_streams_per_client, retry_after_s=settings.retry_after_s
    )
    # image fetches run here, not on the threads that read uploads (a slow server must not stall those);
    # one client's fetches may hold half of the threads
    app.state.fetch_pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="rtprune-fetch")
    app.state.fetches = FetchShares(total=None, per_client=FETCH_THREADS // 2, retry_after_s=settings.retry_after_s)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(mistral_ocr.router)  # JSON bodies only; before the form route of the same path
    app.include_router(ocr.router)
    app.include_router(chat.router)
    app.include_router(jobs.router)
    web.attach(app)
    describe_uploads_as_multipart(app)
    # added last = outermost: the request id exists before auth, admission and the body limit answer
    app.add_middleware(  # inside the body limit
        JsonBodyMiddleware, max_bytes=JSON_BESIDE_IMAGES_BYTES, max_image_bytes=settings.max_upload_bytes
    )
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_upload_bytes,
        timeout_s=settings.body_timeout_s,
        min_rate=settings.min_upload_bytes_per_s,
    )
    app.add_middleware(
        AdmissionMiddleware,
        paths={"/v1/ocr", "/v1/chat/completions"},
        full=lambda: hasattr(app.state, "scheduler") and app.state.scheduler.queue_full(),
        retry_after_s=lambda: app.state.scheduler.retry_after_s(),
    )
    app.add_middleware(
        ConcurrencyLimitMiddleware,
        limit=settings.max_concurrent_requests,
        per_client=settings.max_concurrent_requests_per_client,
        retry_after_s=settings.retry_after_s,
    )
    app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value() if settings.api_key else None)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app
