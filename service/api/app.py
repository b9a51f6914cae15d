"""The app factory: settings in, FastAPI app out; the model loads in the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service import __version__
from service.api import health, ocr, web
from service.api.handlers import install_error_handlers
from service.api.middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from service.engine import OCREngine
from service.engine.worker import Worker
from service.metrics import Metrics
from service.settings import ServiceSettings


def default_loader(settings: ServiceSettings) -> Callable[[], OCREngine]:
    return lambda: OCREngine.load(
        settings.model, device=settings.device, dtype=settings.dtype, cache_dir=settings.cache_dir
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
        worker = Worker(
            load_engine or default_loader(settings),
            queue_size=settings.queue_size,
            max_batch_size=settings.max_batch_size,
            batch_wait_ms=settings.batch_wait_ms,
            warmup=settings.warmup,
            on_page=lambda result: metrics.observe_page(result.stats),
            on_depth=lambda waiting, running: (metrics.queue_depth.set(waiting), metrics.in_flight.set(running)),
            on_fatal=on_fatal,
        )
        app.state.worker = worker
        worker.start()  # loads in the worker thread; /readyz says 503 until it is warm
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    app = FastAPI(
        title="rtprune-ocr",
        version=__version__,
        summary="DeepSeek-OCR with RTPrune visual-token pruning",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(ocr.router)
    web.attach(app)
    # added last = outermost: the request id exists before auth and the body limit answer
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value() if settings.api_key else None)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app
