"""A finished page's answer: its text decoded, cleaned to markdown, its boxes parsed, its statistics."""

from __future__ import annotations

from typing import Any

from .page import PageResult, PreparedPage, settled_adaptation
from .postprocess import decode_text, parse_boxes, to_markdown
from .stats import PageStats, RetentionRequested
from .token_map import build_token_map, preview_data_url


def page_result(page: PreparedPage, tokenizer: Any, version: str) -> PageResult:
    """The page's result once its sequence has finished: text, markdown, boxes, statistics (and its token
    map, when asked for)."""
    block, pruned, seq, task = page.block, page.pruned, page.sequence, page.task
    text = decode_text(tokenizer, seq.outcome.tokens)
    latency = task.timer.latency()
    n_out = len(seq.outcome.tokens)
    dynamic = task.options.fixed_retention is None and pruned.r_sim is not None
    stats = PageStats(
        visual_tokens=block.n_tokens,
        visual_tokens_kept=pruned.n_kept,
        grid_tokens=pruned.n_prunable,
        grid_tokens_kept=pruned.n_kept_prunable,
        retention=round(pruned.n_kept_prunable / pruned.n_prunable, 6) if pruned.n_prunable else 1.0,
        visual_share=round(pruned.n_kept / block.n_tokens, 6),
        retention_requested=RetentionRequested(
            value=task.options.retention,
            dynamic=pruned.keep_ratio if dynamic else None,
            r_sim=pruned.r_sim,
            r_txt=pruned.r_txt,
        ),
        prompt_tokens=seq.prompt.length,
        output_tokens=n_out,
        latency_ms=latency,
        decode_tokens_per_s=round(n_out / (latency.decode / 1e3), 3) if latency.decode > 0 else 0.0,
        finish_reason=seq.outcome.finish_reason,
        adaptation=settled_adaptation(task.adaptation, task.options, pruned),
    )
    result = PageResult(markdown=to_markdown(text), text=text, boxes=parse_boxes(text, block.page.size), stats=stats)
    result._spans = {stage: list(spans) for stage, spans in task.timer.intervals.items()}
    result._page_size = block.page.size
    result._tokens = list(seq.outcome.tokens)
    if task.options.token_map:
        merges = task.options.pruner == "rtprune"
        result.token_map = build_token_map(block, pruned, merges, version)
        result.preview = preview_data_url(task.image)
    return result
