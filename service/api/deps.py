"""FastAPI dependencies: the app's settings, scheduler and metrics, from ``app.state``."""

from __future__ import annotations

from fastapi import Request

from service.metrics import Metrics
from service.scheduler import Scheduler
from service.settings import ServiceSettings


def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


def get_scheduler(request: Request) -> Scheduler:
    return request.app.state.scheduler


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics
