"""Liveness, readiness, metrics and service info."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import MetricsDep, SchedulerDep, SettingsDep
from service.api.info import describe
from service.api.responses import JSONResponse
from service.schemas import InfoResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive (says nothing about the model)")
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/readyz",
    summary="The model is loaded and warmed up; 503 before",
    responses={503: {"description": "loading or failed"}},
)
async def readyz(
    scheduler: SchedulerDep,
    settings: SettingsDep,
) -> JSONResponse:
    if scheduler.state == "ready":
        return JSONResponse({"status": "ready"})
    message = scheduler.error or ("the service is shutting down" if scheduler.state != "loading" else "loading")
    body = {"status": scheduler.state, "error": {"code": "not_ready", "message": message}}
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(registry: MetricsDep) -> Response:
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/info", summary="Model, device, defaults and limits")
async def info(
    scheduler: SchedulerDep,
    settings: SettingsDep,
) -> InfoResponse:
    return describe(scheduler, settings)
