"""Every setting of the service, from CLI flags or ``RTPRUNE_*`` environment variables.

This is the only module that reads the service's environment (``RTPRUNE_CACHE_DIR`` is also read by
``presets.default_cache_dir`` for the tools that load no settings: the GPU check, the evaluation).
``rtprune-ocr serve --help`` and docs/settings.md's table list the same fields.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.engine.names import DEFAULT_MODEL
from service.engine.options import RANDOM_TOKEN_CAP


class ServiceSettings(BaseSettings):
    """Configuration of one service process (one model, one worker)."""

    model_config = SettingsConfigDict(env_prefix="RTPRUNE_", env_file=None, extra="ignore")

    model: str = Field(
        DEFAULT_MODEL, description="hub id, local checkpoint directory, or random preset (tiny, tiny-v2, random-full)"
    )
    device: str | None = Field(None, description="cuda, cuda:N or cpu; default cuda when available")
    dtype: Literal["bf16", "fp16", "fp32"] | None = Field(None, description="default bf16 on CUDA, fp32 on CPU")
    cache_dir: Path | None = Field(None, description="where presets are written (default ~/.cache/rtprune-ocr)")
    decoder: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="transformers: decode in this process; vllm: vision and pruning here, decoding on the "
        "vLLM server at vllm_url (compact positions only)",
    )
    vllm_url: str | None = Field(None, description="base URL of the vLLM server, with decoder=vllm")
    vllm_timeout_s: float = Field(
        120.0, gt=0, description="longest wait for the vLLM server's next token (its queue included); then 503"
    )
    host: str = Field("0.0.0.0", description="interface to listen on")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    api_key: SecretStr | None = Field(
        None, description="when set, /v1/* requires the key: Authorization: Bearer <key>, or X-API-Key"
    )
    max_upload_bytes: int = Field(50 * 1024 * 1024, ge=1024, description="largest accepted request body")
    max_image_pixels: int = Field(40_000_000, ge=4096, description="largest image or rendered PDF page, in pixels")
    max_pdf_pages: int = Field(50, ge=1, description="most PDF pages per request")
    max_document_pixels: int = Field(
        200_000_000, ge=4096, description="most pixels of all a document's pages together; more is 413 before rendering"
    )
    allow_url_fetch: bool = Field(
        False, description="let chat requests name http(s) image URLs for the server to fetch (off: data URLs only)"
    )
    fetch_timeout_s: float = Field(
        10.0, gt=0, description="deadline of such a fetch, connect to last byte; its size limit is the upload's"
    )
    outbound_allow_networks: str = Field(
        "",
        description="networks (CIDR, comma-separated) that image fetches and webhooks may reach although they are "
        "loopback, private, link-local or reserved; default none (public addresses only)",
    )
    webhook_secret: SecretStr | None = Field(
        None, description="signs every webhook body (HMAC-SHA256, X-RTPrune-Signature) so a receiver can trust it"
    )
    max_concurrent_requests: int = Field(
        256, ge=1, description="requests in flight at once (health and metrics exempt); more get 503"
    )
    max_concurrent_requests_per_client: int = Field(
        64, ge=1, description="requests one client (its address) may have in flight; more get 429"
    )
    max_streams: int = Field(
        512, ge=1, description="long-lived streams (job events, streamed chat) open at once; more get 503"
    )
    max_streams_per_client: int = Field(
        16, ge=1, description="streams one client (its address: the API key is shared) may hold open; more get 429"
    )
    stream_idle_s: float = Field(
        600.0, gt=0, description="a job's event stream that has had nothing to say this long ends (reconnect)"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection whose request head has not arrived in this time is closed"
    )
    body_timeout_s: float = Field(30.0, gt=0, description="an upload that sends nothing for this long gets 408")
    min_upload_bytes_per_s: int = Field(
        1024, ge=0, description="an upload slower than this on average, 10 s after its start, gets 408 (0: no minimum)"
    )
    queue_size: int = Field(
        128, ge=1, description="pages that may wait for the model; a document that does not fit gets 503"
    )
    max_queued_pixels: int = Field(
        2_000_000_000,
        ge=4096,
        description="pixels of all waiting pages once decoded (a waiting page holds only its encoded bytes); a "
        "document that does not fit gets 503 with Retry-After",
    )
    batching: Literal["continuous", "static"] = Field(
        "continuous",
        description="continuous: pages join and leave the running batch at every decode step; "
        "static: a batch runs to its end before new pages start (for comparison)",
    )
    max_batch_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="most pages running at once; 1 turns batching off; default: 32 on a CPU, on a GPU the most "
        "rows whose decode step stays within twice the one-row step (measured at start-up, at most 256)",
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=64,
        description="KV-cache budget in tokens (rows x longest row, pruned prompts plus generated tokens); "
        "default: 60% of the GPU memory free after warm-up, 32768 on CPU",
    )
    max_prefill_tokens: int = Field(
        8192, ge=1, description="visual tokens admitted per decode step, so a big document does not stall decoding"
    )
    adaptive_target_wait_s: float | None = Field(
        None,
        gt=0,
        description="adaptive retention: when pages wait longer than this in the queue, pages admitted from then "
        "on are pruned harder (down to adaptive_floor), and the level steps back up as the queue drains; "
        "default off",
    )
    adaptive_floor: float = Field(
        0.5, gt=0, le=1, description="the lowest retention the adaptive policy caps a page at"
    )
    batch_wait_ms: float = Field(5.0, ge=0, le=5000, description="how long an idle batch waits for more pages")
    join_budget_ms: float | None = Field(
        None,
        ge=0,
        description="stall-free joining: while interactive pages decode, a joining page's model work (a SAM layer of "
        "a view, its pruning, each prefill chunk) runs in pieces between decode steps, about this many ms per step (at "
        "least one piece); unset: the median decode step time, measured as it runs; 0: off (a page's whole "
        "vision and prefill run between two steps)",
    )
    interactive_job_pages: int = Field(
        10, ge=0, description="the most pages a job may have and ask for priority=interactive (0: no job may)"
    )
    interactive_rows: int | None = Field(
        None,
        ge=0,
        description="rows of the running batch job pages leave to interactive requests; unset: an eighth of "
        "max_batch_size, at least one",
    )
    prefill_chunk_tokens: int = Field(
        512, ge=16, description="tokens of a joining prompt prefilled between two decode steps (with join_budget_ms)"
    )
    preprocess_threads: int = Field(
        2, ge=1, le=64, description="threads that render and preprocess pages ahead of the model (off its thread)"
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="on SIGTERM, how long running pages may finish; waiting requests get 503 at once"
    )
    request_timeout_s: float = Field(600.0, gt=0, description="per-request deadline (queue + work); then 504")
    random_max_new_tokens: int = Field(
        RANDOM_TOKEN_CAP,
        ge=1,
        le=8192,
        description="on a random-weights preset (tiny), the most new tokens a page may ask for; more is capped "
        "with a warning (random weights never write end-of-text, so a page runs to its budget)",
    )
    sse_keepalive_s: float = Field(
        15.0, gt=0, description="an event stream with nothing to send this long sends a comment (proxies cut idle ones)"
    )
    retry_after_s: int = Field(2, ge=1, description="Retry-After sent with 503")
    jobs_dir: Path | None = Field(
        None, description="where asynchronous jobs are stored (default ~/.cache/rtprune-ocr/jobs); a volume in compose"
    )
    jobs_url: SecretStr | None = Field(
        None,
        description="a PostgreSQL URL (postgresql://user:password@host/db) to keep jobs in, shared by replicas on "
        "any number of hosts (needs the postgres extra); unset keeps them in SQLite under RTPRUNE_JOBS_DIR",
    )
    jobs_concurrency: int = Field(
        8, ge=1, description="jobs one replica runs at once (their pages interleave); more wait for any replica"
    )
    job_retention_s: float = Field(86_400.0, gt=0, description="a job is deleted this long after its last change")
    jobs_max_bytes: int = Field(5_000_000_000, ge=1, description="uploads stored for jobs, all together; more get 503")
    jobs_client_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="the part of RTPRUNE_JOBS_MAX_BYTES one client (its address) may hold in stored job uploads; "
        "more get 429 (an ended or deleted job's upload is freed at once)",
    )
    jobs_per_key: int = Field(
        100,
        ge=1,
        description="unfinished jobs one API key may hold; more 429. Without RTPRUNE_API_KEY the key is whatever a "
        "client sends, so this is no limit: set a key on a shared server",
    )
    allow_webhooks: bool = Field(False, description="let a job name a webhook URL the server POSTs to when it ends")
    warmup: bool = Field(
        True,
        description="run pages through the model before reporting ready: one tiny page, and on a GPU every mode at "
        "its largest (so the KV budget is measured after the vision encoder's peak)",
    )
    max_vision_mb: int = Field(
        4096,
        ge=64,
        description="one vision-encoder call's estimated transient memory at most (SAM's attention bias: ~400 MB a "
        "1024-px view, ~1 GB a Large page); more pages are split into several calls",
    )
    gpu_memory_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="cap this process's share of the GPU (e.g. 0.45 beside a vLLM server at 0.5); default no cap",
    )
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads; default: the CPUs this process may use (cgroup quota included)"
    )
    log_json: bool = Field(True, description="structured JSON log lines")
    # Scale-out on Ray Serve (pip install "rtprune-ocr[ray]"); unset replicas = one process, no Ray.
    replicas: int | None = Field(
        None, ge=1, description="serve N replicas on Ray Serve, one model each (joins RAY_ADDRESS or starts Ray)"
    )
    max_replicas: int | None = Field(
        None, ge=1, description="with replicas: Ray's autoscaler may add replicas up to this many under load"
    )
    replica_gpus: float | None = Field(
        None, ge=0, description="GPUs per replica; default 1 when the Ray cluster has GPUs, else 0"
    )
    replica_cpus: float | None = Field(
        None,
        gt=0,
        description="CPUs per replica; default: threads, else 4 with GPUs (fewer if the cluster lacks them), "
        "else the CPUs split evenly",
    )
    replica_metrics_port: int | None = Field(
        9400, ge=1, le=65535, description="each replica also serves /metrics on this port + its rank on the node"
    )

    def apply_threads(self) -> int:
        return apply_threads(self.threads)

    def outbound_policy(self):
        """Where image fetches and webhooks may connect (:mod:`service.outbound`)."""
        from service.outbound import Policy

        return Policy.from_setting(self.outbound_allow_networks.split(","))

    @model_validator(mode="after")
    def _check(self) -> ServiceSettings:
        if self.api_key is not None and not self.api_key.get_secret_value():
            self.api_key = None  # an empty RTPRUNE_API_KEY means no key, not a key that is empty
        if self.webhook_secret is not None and not self.webhook_secret.get_secret_value():
            self.webhook_secret = None
        if self.jobs_url is not None and not self.jobs_url.get_secret_value():
            self.jobs_url = None  # empty (compose passes RTPRUNE_JOBS_URL= through): SQLite
        if self.jobs_url is not None and not self.jobs_url.get_secret_value().startswith(("postgresql:", "postgres:")):
            raise ValueError("jobs_url must be a PostgreSQL URL: postgresql://user:password@host:5432/database")
        try:
            self.outbound_policy()
        except ValueError as exc:
            raise ValueError(f"outbound_allow_networks: {exc}") from None
        if self.decoder == "vllm" and not self.vllm_url:
            raise ValueError("decoder=vllm needs the vLLM server's URL: set RTPRUNE_VLLM_URL (--vllm-url)")
        if self.max_replicas is not None and self.max_replicas < (self.replicas or 1):
            raise ValueError(f"max_replicas ({self.max_replicas}) must be at least replicas ({self.replicas or 1})")
        if self.queue_size < self.max_pdf_pages:
            raise ValueError(
                f"queue_size ({self.queue_size} pages) must be at least max_pdf_pages ({self.max_pdf_pages}): "
                "a document is queued whole, so a larger one could never run; raise RTPRUNE_QUEUE_SIZE"
            )
        return self

    def scheduler_config(self):
        """The scheduler's share of the settings (its fields carry the same names)."""
        from dataclasses import fields

        from service.scheduler import SchedulerConfig

        return SchedulerConfig(**{field.name: getattr(self, field.name) for field in fields(SchedulerConfig)})


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (more threads than CPUs makes every kernel wait); returns the number."""
    import torch

    threads = threads or usable_cpus()
    torch.set_num_threads(threads)
    return threads
