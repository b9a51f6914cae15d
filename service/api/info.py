"""``GET /v1/info``'s answer: the model and device the scheduler loaded, this engine's option defaults, the
limits and the batching as they are (measured ones included), read from the scheduler and the settings."""

from __future__ import annotations

from pruning import PRUNERS
from service import __version__
from service.engine import OcrOptions
from service.engine.options import MAX_NEW_TOKENS
from service.scheduler import Scheduler
from service.schemas import Batching, InfoResponse, Limits
from service.settings import ServiceSettings


def describe(scheduler: Scheduler, settings: ServiceSettings) -> InfoResponse:
    """The service as it runs now (before the model has loaded: what is known without it)."""
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
