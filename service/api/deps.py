"""FastAPI dependencies: the app's settings, worker and metrics, from ``app.state``."""

from __future__ import annotations

from fastapi import Request

from service.engine.worker import Worker
from service.metrics import Metrics
from service.settings import ServiceSettings


def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


def get_worker(request: Request) -> Worker:
    return request.app.state.worker


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics
