"""Per-page statistics and the stage timer that fills them.

The field names are the HTTP API's: the engine's result is serialised as is.

The timer keeps, per stage, the wall-clock intervals it covered (not only their sum), so a
request of several pages can report each stage's time without counting twice the work its
pages shared: a batched vision call, prefill or decode step is one interval in each page's
timer, and the request's figure is the length of the union of its pages' intervals.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import BaseModel, Field

STAGES = ("queue", "preprocess", "vision", "prune", "assemble", "prefill", "decode")


class LatencyMs(BaseModel):
    """Wall time per stage in milliseconds, the device synchronised before each reading."""

    queue: float = 0.0
    preprocess: float = 0.0
    vision: float = 0.0
    prune: float = 0.0
    assemble: float = Field(0.0, description="building the prompt's embeddings around the kept tokens")
    prefill: float = Field(0.0, description="the LLM's forward over the prompt, first token included")
    decode: float = 0.0
    total: float = 0.0


class RetentionRequested(BaseModel):
    """What the request asked for; for ``auto`` also the dynamic ratio and its two terms."""

    value: float | Literal["auto"]
    dynamic: float | None = Field(None, description="RTPrune's per-image ratio r = 1 - (1 - r_sim)(1 - r_txt)")
    r_sim: float | None = Field(None, description="token dissimilarity term")
    r_txt: float | None = Field(None, description="text density (edge share) of the global view")


class Adaptation(BaseModel):
    """Why a page's retention was capped under load (``RTPRUNE_ADAPTIVE_TARGET_WAIT_S``); absent when the
    policy is off or the page is pinned (``adapt=false``, or pruner none)."""

    adapted: bool = Field(description="the cap lowered this page's retention below what it asked for")
    cap: float = Field(description="the most retention the server allowed this page when it was admitted")
    queue_wait_s: float = Field(
        description="the load signal when this page was admitted: the median queue wait of the pages admitted "
        "last, or the wait so far of the third page still queued when longer"
    )
    target_wait_s: float = Field(description="the wait above which the policy prunes harder")


class PageStats(BaseModel):
    visual_tokens: int = Field(description="visual block before pruning, newlines and separator included")
    visual_tokens_kept: int = Field(description="visual block after pruning")
    grid_tokens: int = Field(description="the prunable (grid) tokens of the block: all but newlines and separator")
    grid_tokens_kept: int = Field(description="grid tokens left after pruning")
    retention: float = Field(
        description="grid_tokens_kept / grid_tokens: the share the request's `retention` asks for (one definition)"
    )
    visual_share: float = Field(
        description="visual_tokens_kept / visual_tokens: the share of the whole visual block that reached the LLM"
    )
    retention_requested: RetentionRequested
    prompt_tokens: int = Field(description="tokens prefilled (pruned prompt)")
    output_tokens: int
    latency_ms: LatencyMs
    decode_tokens_per_s: float
    finish_reason: Literal["eos", "length"] = Field(description="eos, or the max_new_tokens / position budget ran out")
    adaptation: Adaptation | None = Field(
        None, description="retention capped under load: the cap, the load signal, whether it lowered this page"
    )


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
        end = time.perf_counter()
        for timer in timers:
            timer.add_interval(name, start, end)


class StageTimer:
    """Accumulates stage wall times; synchronises CUDA so queued kernels are counted.

    ``ms`` holds each stage's total; ``intervals`` the (start, end) perf_counter spans behind
    it (spans that overlap or touch are merged)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.ms: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.intervals: dict[str, list[tuple[float, float]]] = {name: [] for name in STAGES}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with shared_stage([self], name, self.device):
            yield

    @contextmanager
    def host_stage(self, name: str) -> Iterator[None]:
        """Time work that runs on the host alone (rendering, resizing): no device synchronisation, so it
        may run on a thread that must not wait for the GPU."""
        with shared_stage([self], name, "cpu"):
            yield

    def add(self, name: str, ms: float) -> None:
        """Charge ``ms`` that ended now (a span whose start is ``ms`` ago)."""
        end = time.perf_counter()
        self.add_interval(name, end - ms / 1e3, end)

    def add_interval(self, name: str, start: float, end: float) -> None:
        self.ms[name] = self.ms.get(name, 0.0) + (end - start) * 1e3
        spans = self.intervals.setdefault(name, [])
        if spans and start <= spans[-1][1]:  # overlaps or touches the previous span
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))

    def latency(self) -> LatencyMs:
        return LatencyMs(**{k: round(v, 3) for k, v in self.ms.items()}, total=round(sum(self.ms.values()), 3))


def union_ms(spans: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) spans, in milliseconds: shared work counted once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total * 1e3
