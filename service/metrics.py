"""Prometheus metrics of one app, in a registry of its own (so tests can build many apps)."""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.engine.device import memory_bytes
from service.engine.stats import STAGES, PageStats
from service.jobs.store import STATES, Backlog
from service.scheduler.queue import PRIORITIES

if TYPE_CHECKING:
    from service.engine.options import OcrOptions
    from service.scheduler import Scheduler

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rtprune_requests", "OCR requests by HTTP status", ["status"], registry=r)
        page = ["mode", "pruner"]  # what a page asked for: the knobs that change its cost
        self.pages = Counter("rtprune_pages", "pages OCR'd, by mode and pruner", page, registry=r)
        self.stage_seconds = Histogram(
            "rtprune_stage_seconds",
            "per-page latency by stage and mode",
            ["stage", "mode"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "rtprune_request_seconds", "end-to-end request latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.visual_tokens = Counter(
            "rtprune_visual_tokens",
            "visual tokens before (in) and after (kept) pruning, by mode and pruner",
            ["kind", *page],
            registry=r,
        )
        self.output_tokens = Counter("rtprune_output_tokens", "generated tokens, by mode and pruner", page, registry=r)
        self.queue_depth = Gauge("rtprune_queue_depth", "pages waiting for the model (queued pages)", registry=r)
        self.in_flight = Gauge("rtprune_in_flight", "requests with a page running", registry=r)
        self.running_pages = Gauge("rtprune_running_pages", "pages in the running batch or about to join", registry=r)
        self.batch_tokens = Gauge(
            "rtprune_batch_tokens", "KV-cache tokens in use (rows x longest row, padding included)", registry=r
        )
        self.batch_tokens_limit = Gauge("rtprune_batch_tokens_limit", "the KV-cache token budget", registry=r)
        self.decode_steps = Counter("rtprune_decode_steps", "decode steps of the running batch", registry=r)
        self.steps_per_second = Gauge("rtprune_decode_steps_per_second", "decode steps/s over 5 s", registry=r)
        self.ready = Gauge("rtprune_ready", "1 when the model is loaded and warm", registry=r)
        self.retention_level = Gauge(
            "rtprune_adaptive_retention_level", "retention cap of pages admitted now (1: none, or off)", registry=r
        )
        self.queue_wait = Gauge(
            "rtprune_queue_wait_seconds",
            "the adaptive policy's load signal: median queue wait of the pages admitted last, or the third "
            "queued page's wait so far when longer",
            registry=r,
        )
        self.pages_adapted = Counter(
            "rtprune_pages_adapted", "pages whose retention the adaptive policy lowered", ["mode"], registry=r
        )
        self.jobs = Gauge("rtprune_jobs", "jobs in the store by state (all replicas')", ["state"], registry=r)
        self.oldest_queued_job = Gauge(
            "rtprune_jobs_oldest_queued_seconds", "how long the oldest queued job has waited (0: none)", registry=r
        )
        self.store_seconds = Histogram(
            "rtprune_job_store_seconds",
            "time of job-store operations (claim, renew, save a page, ...)",
            ["operation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=r,
        )
        self._oldest_queued: float | None = None
        self.oldest_queued_job.set_function(
            lambda: 0.0 if self._oldest_queued is None else max(0.0, time.time() - self._oldest_queued)
        )
        self.queued_by_priority = Gauge(
            "rtprune_queued_pages",
            "pages waiting for the model, by class (interactive, batch)",
            ["priority"],
            registry=r,
        )
        self.gpu_memory = Gauge(
            "rtprune_gpu_memory_bytes", "GPU memory of this process: allocated, reserved, peak", ["kind"], registry=r
        )

    def watch(self, scheduler: Scheduler) -> None:
        """The gauges read the scheduler when scraped, so every exporter of this registry (the app's
        ``/metrics``, a Ray replica's own metrics port) shows the values of that moment."""
        self.queue_depth.set_function(lambda: scheduler.queued_pages)
        self.in_flight.set_function(lambda: scheduler.running_requests)
        self.running_pages.set_function(lambda: scheduler.running_pages)
        self.batch_tokens.set_function(lambda: scheduler.batch_tokens)
        self.batch_tokens_limit.set_function(lambda: scheduler.batch_tokens_limit or 0)
        self.steps_per_second.set_function(scheduler.steps_per_s)
        self.ready.set_function(lambda: 1 if scheduler.state == "ready" else 0)
        self.retention_level.set_function(lambda: scheduler.retention_level)
        self.queue_wait.set_function(lambda: scheduler.last_queue_wait_s)
        for kind in ("allocated", "reserved", "peak"):
            self.gpu_memory.labels(kind).set_function(functools.partial(gpu_memory, scheduler, kind))
        for priority in PRIORITIES:
            self.queued_by_priority.labels(priority).set_function(functools.partial(scheduler.queued_by, priority))

    def observe_backlog(self, backlog: Backlog) -> None:
        """The store's job counts, as the job runner last read them (every few seconds); the oldest
        queued job's age is computed when scraped."""
        for state in STATES:
            self.jobs.labels(state).set(backlog.jobs.get(state, 0))
        self._oldest_queued = backlog.oldest_queued

    def observe_store(self, operation: str, seconds: float) -> None:
        self.store_seconds.labels(operation).observe(seconds)

    def observe_page(self, stats: PageStats, options: OcrOptions) -> None:
        """One finished page, labelled with its mode and pruner (a few values each: bounded series)."""
        mode, pruner = options.mode.value, options.pruner
        self.pages.labels(mode, pruner).inc()
        latency = stats.latency_ms
        for stage in (*STAGES, "total"):
            self.stage_seconds.labels(stage, mode).observe(getattr(latency, stage) / 1e3)
        self.visual_tokens.labels("in", mode, pruner).inc(stats.visual_tokens)
        self.visual_tokens.labels("kept", mode, pruner).inc(stats.visual_tokens_kept)
        self.output_tokens.labels(mode, pruner).inc(stats.output_tokens)
        if stats.adaptation is not None and stats.adaptation.adapted:
            self.pages_adapted.labels(mode).inc()


def gpu_memory(scheduler: Scheduler, kind: str) -> int:
    """One of :func:`memory_bytes`' figures for the scheduler's device (0 before the model is loaded)."""
    engine = scheduler.engine
    return memory_bytes(engine.device)[kind] if engine is not None else 0
