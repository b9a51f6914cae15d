"""Per-page statistics and the stage timer that fills them.

The field names are the HTTP API's: the engine's result is serialised as is.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import BaseModel, Field

STAGES = ("queue", "preprocess", "vision", "prune", "prefill", "decode")


class LatencyMs(BaseModel):
    """Wall time per stage in milliseconds, the device synchronised before each reading."""

    queue: float = 0.0
    preprocess: float = 0.0
    vision: float = 0.0
    prune: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    total: float = 0.0


class RetentionRequested(BaseModel):
    """What the request asked for; for ``auto`` also the dynamic ratio and its two terms."""

    value: float | Literal["auto"]
    dynamic: float | None = Field(None, description="RTPrune's per-image ratio r = 1 - (1 - r_sim)(1 - r_txt)")
    r_sim: float | None = Field(None, description="token dissimilarity term")
    r_txt: float | None = Field(None, description="text density (edge share) of the global view")


class PageStats(BaseModel):
    visual_tokens: int = Field(description="visual block before pruning, newlines and separator included")
    visual_tokens_kept: int = Field(description="visual block after pruning")
    retention: float = Field(description="visual_tokens_kept / visual_tokens")
    retention_requested: RetentionRequested
    prompt_tokens: int = Field(description="tokens prefilled (pruned prompt)")
    output_tokens: int
    latency_ms: LatencyMs
    decode_tokens_per_s: float
    finish_reason: Literal["eos", "length"] = Field(description="eos, or the max_new_tokens / position budget ran out")


@contextmanager
def shared_stage(timers: list[StageTimer], name: str, device: torch.device | str) -> Iterator[None]:
    """Time one stage that several requests share (a batched forward) and charge it to each."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = (time.perf_counter() - start) * 1e3
        for timer in timers:
            timer.add(name, elapsed)


class StageTimer:
    """Accumulates stage wall times; synchronises CUDA so queued kernels are counted."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.ms: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self._started = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with shared_stage([self], name, self.device):
            yield

    def add(self, name: str, ms: float) -> None:
        self.ms[name] = self.ms.get(name, 0.0) + ms

    def latency(self) -> LatencyMs:
        return LatencyMs(**{k: round(v, 3) for k, v in self.ms.items()}, total=round(sum(self.ms.values()), 3))
