"""Response models of the HTTP API (they are also its OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from service.engine import PageResult
from service.engine.stats import LatencyMs, union_ms

PAGE_SEPARATOR = "\n\n<--- Page Split --->\n\n"  # what the official PDF script writes between pages


class PageOut(PageResult):
    page: int = Field(description="1-based page number in the uploaded document")


class AggregateStats(BaseModel):
    """Totals over the pages of one request."""

    pages: int
    visual_tokens: int
    visual_tokens_kept: int
    grid_tokens: int
    grid_tokens_kept: int
    retention: float = Field(description="grid_tokens_kept / grid_tokens over all pages")
    visual_share: float = Field(description="visual_tokens_kept / visual_tokens over all pages")
    prompt_tokens: int
    output_tokens: int
    latency_ms: LatencyMs = Field(
        description="per stage, the wall time during which at least one page of the request was in it (work its "
        "pages shared in one batch counts once); queue is the first page's wait; total is the request's wall time"
    )
    decode_tokens_per_s: float = Field(description="output tokens / decode wall time of the request")


class OcrResponse(BaseModel):
    model: str
    random_weights: bool = Field(description="true for the tiny / random-full presets: the text is meaningless")
    mode: str
    task: str
    pruner: str
    retention: float | Literal["auto"]
    markdown: str = Field(description="all pages' markdown, joined by the official page separator")
    pages: list[PageOut]
    stats: AggregateStats
    warnings: list[str] = Field(default_factory=list)


class Limits(BaseModel):
    max_upload_bytes: int
    max_image_pixels: int
    max_pdf_pages: int
    max_document_pixels: int
    max_concurrent_requests: int
    queue_size: int = Field(description="pages that may wait for the model")
    request_timeout_s: float
    max_new_tokens: int = Field(description="most new tokens a page may ask for (capped on a random-weights preset)")


class Batching(BaseModel):
    mode: Literal["continuous", "static"]
    max_batch_size: int = Field(description="most pages running at once")
    max_batch_tokens: int | None = Field(description="KV-cache budget in tokens (known once the model is loaded)")
    max_prefill_tokens: int = Field(description="visual tokens admitted per decode step")
    batch_wait_ms: float
    join_budget: Literal["measured", "set", "off"] = Field(
        description="stall-free joining: 'measured' follows the median decode step, 'set' is RTPRUNE_JOIN_BUDGET_MS"
    )
    join_budget_ms: float = Field(
        description="joining work (vision views, pruning, prefill chunks) run between two decode steps now, at "
        "least one piece; 0 when off, or while nothing has decoded yet"
    )
    prefill_chunk_tokens: int = Field(description="a joining prompt's tokens prefilled between two decode steps")


class InfoResponse(BaseModel):
    service_version: str
    model: str
    model_version: Literal["v1", "v2"] | None
    random_weights: bool | None
    device: str | None
    dtype: str | None
    state: str
    modes: list[str]
    pruners: list[str]
    defaults: dict[str, object]
    limits: Limits
    batching: Batching
    decoder: Literal["transformers", "vllm"] = Field(
        "transformers", description="where pages decode: this process, or a vLLM server (compact positions only)"
    )
    runtime: dict[str, str | None] | None = Field(
        None,
        description="what the model runs on: device, gpu, compute_capability, torch, torch_cuda (the wheel's CUDA "
        "build), driver, dtype, attention and experts implementations",
    )


def aggregate(pages: list[PageResult], wall_ms: float) -> AggregateStats:
    """The request's statistics from its pages': token counts summed, stage times as unions of spans."""
    total = sum(p.stats.visual_tokens for p in pages)
    kept = sum(p.stats.visual_tokens_kept for p in pages)
    grid = sum(p.stats.grid_tokens for p in pages)
    grid_kept = sum(p.stats.grid_tokens_kept for p in pages)
    out = sum(p.stats.output_tokens for p in pages)
    stages = {
        stage: round(union_ms([span for p in pages for span in p._spans.get(stage, [])]), 3)
        for stage in ("preprocess", "vision", "prune", "assemble", "prefill", "decode")
    }
    latency = LatencyMs(queue=pages[0].stats.latency_ms.queue if pages else 0.0, **stages, total=round(wall_ms, 3))
    return AggregateStats(
        pages=len(pages),
        visual_tokens=total,
        visual_tokens_kept=kept,
        grid_tokens=grid,
        grid_tokens_kept=grid_kept,
        retention=round(grid_kept / grid, 6) if grid else 1.0,
        visual_share=round(kept / total, 6) if total else 1.0,
        prompt_tokens=sum(p.stats.prompt_tokens for p in pages),
        output_tokens=out,
        latency_ms=latency,
        decode_tokens_per_s=round(out / (latency.decode / 1e3), 3) if latency.decode > 0 else 0.0,
    )
