"""Liveness, readiness, metrics and service info."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pruning import PRUNERS
from service import __version__
from service.api.deps import get_metrics, get_settings, get_worker
from service.engine import OcrOptions
from service.engine.worker import Worker
from service.metrics import Metrics
from service.schemas import InfoResponse, Limits
from service.settings import ServiceSettings

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive (says nothing about the model)")
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/readyz",
    summary="The model is loaded and warmed up; 503 before",
    responses={503: {"description": "loading or failed"}},
)
async def readyz(worker: Annotated[Worker, Depends(get_worker)]) -> JSONResponse:
    if worker.state == "ready":
        return JSONResponse({"status": "ready"})
    body = {"status": worker.state, "error": {"code": "not_ready", "message": worker.error or "the model is loading"}}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(
    worker: Annotated[Worker, Depends(get_worker)], registry: Annotated[Metrics, Depends(get_metrics)]
) -> Response:
    registry.queue_depth.set(worker.waiting)
    registry.in_flight.set(worker.running)
    registry.ready.set(1 if worker.state == "ready" else 0)
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/info", summary="Model, device, defaults and limits")
async def info(
    worker: Annotated[Worker, Depends(get_worker)], settings: Annotated[ServiceSettings, Depends(get_settings)]
) -> InfoResponse:
    engine = worker.engine
    defaults = OcrOptions().model_dump(mode="json", exclude={"ref", "prompt"})
    return InfoResponse(
        service_version=__version__,
        model=settings.model,
        model_version=engine.version if engine else None,
        random_weights=engine.random_weights if engine else None,
        device=str(engine.device) if engine else None,
        dtype=str(engine.model.dtype).removeprefix("torch.") if engine else None,
        state=worker.state,
        modes=engine.modes if engine else [],
        pruners=list(PRUNERS),
        defaults=defaults,
        limits=Limits(
            max_upload_bytes=settings.max_upload_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_pdf_pages=settings.max_pdf_pages,
            queue_size=settings.queue_size,
            request_timeout_s=settings.request_timeout_s,
        ),
    )
