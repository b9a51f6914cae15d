"""FastAPI dependencies: the app's settings, scheduler, job runner and metrics, from ``app.state``, each
with its ``Annotated`` alias, written once here (as the FastAPI template's ``SessionDep``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.jobs import JobRunner
from service.metrics import Metrics
from service.scheduler import Scheduler
from service.settings import ServiceSettings


def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


def get_scheduler(request: Request) -> Scheduler:
    return request.app.state.scheduler


def get_runner(request: Request) -> JobRunner:
    return request.app.state.jobs


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
SchedulerDep = Annotated[Scheduler, Depends(get_scheduler)]
RunnerDep = Annotated[JobRunner, Depends(get_runner)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
