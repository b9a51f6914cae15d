"""Liveness, readiness, metrics and service info."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pruning import PRUNERS
from service import __version__
from service.api.deps import get_metrics, get_scheduler, get_settings
from service.api.responses import JSONResponse
from service.engine import OcrOptions
from service.engine.options import MAX_NEW_TOKENS
from service.metrics import Metrics
from service.scheduler import Scheduler
from service.schemas import Batching, InfoResponse, Limits
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
async def readyz(
    scheduler: Annotated[Scheduler, Depends(get_scheduler)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
) -> JSONResponse:
    if scheduler.state == "ready":
        return JSONResponse({"status": "ready"})
    message = scheduler.error or ("the service is shutting down" if scheduler.state != "loading" else "loading")
    body = {"status": scheduler.state, "error": {"code": "not_ready", "message": message}}
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(registry: Annotated[Metrics, Depends(get_metrics)]) -> Response:
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/info", summary="Model, device, defaults and limits")
async def info(
    scheduler: Annotated[Scheduler, Depends(get_scheduler)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
) -> InfoResponse:
    engine = scheduler.engine
    # this engine's defaults (a random preset's small budget, the vLLM decoder's positions)
    defaults = (engine.resolve_options({})[0] if engine else OcrOptions()).model_dump(
        mode="json", exclude={"ref", "prompt"}
    )
    most_tokens = settings.random_max_new_tokens if engine and engine.random_weights else MAX_NEW_TOKENS
    return InfoResponse(
        service_version=__version__,
        model=settings.model,
        model_version=engine.version if engine else None,
        random_weights=engine.random_weights if engine else None,
        device=str(engine.device) if engine else None,
        dtype=str(engine.model.dtype).removeprefix("torch.") if engine else None,
        state=scheduler.state,
        modes=engine.modes if engine else [],
        pruners=list(PRUNERS),
        defaults=defaults,
        limits=Limits(
            **settings.model_dump(include=set(Limits.model_fields) - {"queue_size"}),
            queue_size=scheduler.queue_capacity,
            max_new_tokens=most_tokens,
        ),
        batching=Batching(
            mode=settings.batching,
            max_batch_tokens=scheduler.batch_tokens_limit,
            max_batch_size=scheduler.max_rows,
            join_budget=_join_budget(settings),
            join_budget_ms=scheduler.join_budget_ms,
            **settings.model_dump(include={"max_prefill_tokens", "batch_wait_ms", "prefill_chunk_tokens"}),
        ),
        decoder=settings.decoder,
        runtime=engine.facts.as_dict() if engine else None,
    )


def _join_budget(settings: ServiceSettings) -> str:
    if settings.batching == "static" or settings.join_budget_ms == 0:
        return "off"
    return "measured" if settings.join_budget_ms is None else "set"
