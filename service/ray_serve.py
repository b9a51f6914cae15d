"""Scale-out on Ray Serve: N replicas of the same FastAPI app, each with its own model and scheduler.

Nothing of the request walk is copied here. Each replica calls ``create_app`` (so every route,
schema and error is the one-machine service's) and keeps its own continuous batching; Ray's proxy
spreads requests over the replicas, queues the overflow and refuses beyond that with 503 +
Retry-After (Ray's ``max_queued_requests`` and ``backpressure_config``). A replica is routed to only
after its model is loaded and warmed: Ray's initial health check waits for the scheduler.

Three ways in, one deployment:
- ``rtprune-ocr serve --replicas N`` (``run``): joins the cluster in ``RAY_ADDRESS`` or starts a local one;
- ``serve run docker/ray/serve.yaml`` (``build_app``, the config file's ``import_path``);
- a KubeRay ``RayService`` whose ``serveConfigV2`` is that file (docker/ray/rayservice.yaml).

Needs the ``ray`` extra; the single-process service never imports this module.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from typing import Any

import ray
from ray import serve
from ray.serve.config import HTTPOptions

from service.api.app import create_app
from service.api.middleware import ResponseHeadersMiddleware
from service.scheduler import Scheduler
from service.scheduler.capacity import CPU_ROWS
from service.settings import ServiceSettings, apply_threads

log = logging.getLogger("rtprune_ocr.ray")

APP_NAME = "rtprune-ocr"
DEPLOYMENT_NAME = "OCR"
# Ray polls this often; a replica whose model failed (or whose process died) is replaced.
HEALTH_CHECK_PERIOD_S = 5.0
GPU_ROWS_HINT = 128  # rows a GPU replica is expected to run when its cap is measured (Ray's queue sizing)
GPU_REPLICA_CPUS = 4  # CPUs a GPU replica asks for (as the docker/ray files do), when the cluster has them


async def wait_until_loaded(scheduler: Scheduler) -> None:
    """Return once the model is loaded and warm; raise if loading failed or the replica is stopping.

    Ray runs this as the replica's first health check, before it routes a single request to it,
    and then every ``HEALTH_CHECK_PERIOD_S``: a replica that raises is restarted by Ray."""
    await scheduler.loaded()
    if scheduler.state != "ready":
        raise RuntimeError(f"model not ready ({scheduler.state}): {scheduler.error or 'no detail'}")


@serve.ingress()  # the app is built per replica, by __serve_build_asgi_app__, after __init__
class OCRReplica:
    """One replica: one engine, one scheduler, the whole FastAPI app."""

    async def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        apply_threads(settings.threads or (max(1, math.floor(cpus)) if cpus else None))

    def __serve_build_asgi_app__(self):
        context = serve.get_replica_context()
        app = create_app(self.settings)
        app.add_middleware(
            ResponseHeadersMiddleware,
            headers={"X-Replica-Id": context.replica_tag},
            drop=frozenset({"x-request-id"}),  # Ray's proxy sends it (the same id: it put it in the request)
        )
        if self.settings.replica_metrics_port is not None:
            serve_metrics(app.state.metrics.registry, self.settings.replica_metrics_port + context.rank.local_rank)
        return app

    async def check_health(self) -> None:
        await wait_until_loaded(self.app.state.scheduler)


def serve_metrics(registry: Any, port: int) -> None:
    """This replica's Prometheus registry on a port of its own (the proxy's /metrics reaches only one
    replica per scrape). A port in use is logged, not fatal: the service matters more than its metrics."""
    from prometheus_client import start_http_server

    try:
        start_http_server(port, registry=registry)
        log.info("replica metrics on port %d", port)
    except OSError as exc:
        log.warning("replica metrics not served on port %d: %s", port, exc)


def deployment_options(settings: ServiceSettings, cluster: dict[str, float]) -> dict[str, Any]:
    """Ray Serve options derived from the service's own settings and the cluster's resources.

    - ``max_ongoing_requests`` = 2 x ``max_batch_size``: a replica holds its running batch plus a batch of
      waiting pages, so a row that frees is refilled at the next step without a round trip to Ray
      (and probes or job polls are not stuck behind it); the rest wait in Ray's queue, from which the
      least busy replica takes the next one.
    - ``max_queued_requests`` = ``queue_size``; past it Ray answers 503 with ``Retry-After``.
    - with ``max_replicas``, Ray's autoscaler keeps about ¾ of a batch of requests on each replica.
    """
    replicas = settings.replicas or 1
    gpus = settings.replica_gpus if settings.replica_gpus is not None else (1.0 if cluster.get("GPU", 0) else 0.0)
    rows = settings.max_batch_size or (GPU_ROWS_HINT if gpus else CPU_ROWS)  # a GPU replica measures its own
    if settings.replica_cpus is not None:
        cpus = settings.replica_cpus
    elif settings.threads is not None:
        cpus = float(settings.threads)
    elif gpus:  # the page's CPU work (PDF rendering, resizing) must keep up with a GPU
        cpus = float(max(1, min(GPU_REPLICA_CPUS, math.floor(cluster.get("CPU", 1) / replicas))))
    else:  # CPU replicas share the machine; more threads per replica than cores only makes them wait
        cpus = max(1.0, math.floor(cluster.get("CPU", 1) / (settings.max_replicas or replicas)))
    options: dict[str, Any] = {
        "max_ongoing_requests": 2 * rows,
        "max_queued_requests": settings.queue_size,
        "backpressure_config": {"status_code": 503, "retry_after_s": settings.retry_after_s},
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "graceful_shutdown_timeout_s": settings.shutdown_grace_s + 5,
    }
    if settings.max_replicas is not None and settings.max_replicas > replicas:
        options["autoscaling_config"] = {
            "min_replicas": replicas,
            "initial_replicas": replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": max(1.0, 0.75 * rows),
        }
    else:
        options["num_replicas"] = replicas
    return options


def application(settings: ServiceSettings) -> serve.Application:
    """The deployment bound to its settings; Ray must already be initialised (for the resources)."""
    options = deployment_options(settings, ray.cluster_resources())
    return serve.deployment(OCRReplica, name=DEPLOYMENT_NAME).options(**options).bind(settings)


def build_app(args: dict[str, Any]) -> serve.Application:
    """``import_path`` of a Serve config file: ``args`` are ServiceSettings fields (RTPRUNE_* variables
    of the runtime environment apply too); the file's own ``deployments`` entries override the
    derived options."""
    return application(ServiceSettings(**args))


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(0)  # unwinds start-up or the wait alike, through run's ``finally``


def run(settings: ServiceSettings) -> None:
    """``rtprune-ocr serve --replicas N``: run the deployment behind Ray's HTTP proxy until SIGTERM/SIGINT."""
    from service.server import configure_logging

    configure_logging(settings.log_json)
    ray.init(logging_level=logging.WARNING)  # RAY_ADDRESS joins a cluster; without it, a local one starts
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)
    try:
        serve.start(http_options=HTTPOptions(host=settings.host, port=settings.port))
        log.info("starting %d replica(s) of %s", settings.replicas or 1, settings.model)
        serve.run(application(settings), name=APP_NAME, route_prefix="/")
        log.info("ready on http://%s:%d (Ray Serve)", settings.host, settings.port)
        threading.Event().wait()  # until a signal
    finally:
        serve.shutdown()  # replicas drain (graceful_shutdown_timeout_s) and release their GPUs
        ray.shutdown()
