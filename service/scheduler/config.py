"""The scheduler's knobs, one field per setting (built from the settings by
:meth:`service.settings.ServiceSettings.scheduler_config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Batching = Literal["continuous", "static"]


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's knobs (from :class:`~service.settings.ServiceSettings`)."""

    queue_size: int = 128  # pages
    max_batch_size: int | None = None  # pages running at once; None: measured on a GPU, 32 on a CPU
    max_batch_tokens: int | None = None  # KV slots; None: from the device's free memory
    max_prefill_tokens: int = 8192  # visual tokens admitted per iteration
    batch_wait_ms: float = 5.0
    batching: Batching = "continuous"
    retry_after_s: int = 2
    warmup: bool = True
    preprocess_threads: int = 2  # threads that render and preprocess pages ahead of admission
    max_queued_pixels: int | None = 2_000_000_000  # pixels of the waiting pages (decoded); None: no bound
    adaptive_target_wait_s: float | None = None  # lower retention when pages wait longer (None: off)
    adaptive_floor: float = 0.5  # ... never below this
    join_budget_ms: float | None = None  # joining work between two decode steps; None: the median step time, 0: off
    prefill_chunk_tokens: int = 512  # a joining prompt's prefill, a chunk at a time while pages decode
    interactive_rows: int | None = None  # rows job pages leave to interactive ones; None: an eighth, at least 1
