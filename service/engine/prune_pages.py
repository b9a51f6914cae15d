"""Pruning the pages of one engine call: each page's pruner (its retention, capped under load), and the
pages pruned together in one batched pass, or alone when that fails."""

from __future__ import annotations

import torch

from pruning import PruneResult, build_pruner, prune_together

from .model import VisualBlock
from .page import PageTask
from .stats import shared_stage


def prune_pages(pages: dict[int, tuple[VisualBlock, PageTask]]) -> dict[int, PruneResult | Exception]:
    """Prune every encoded page of one call together (:func:`pruning.prune_together`: RTPrune pages in
    one batched device pass with one read); each page is charged the shared time. If the joint call
    fails, each page is pruned alone, so a bad page fails alone."""
    if not pages:
        return {}
    order = list(pages)
    calls = [(page_pruner(pages[i][1]), *prune_inputs(pages[i][0])) for i in order]
    device = pages[order[0]][0].features.device
    try:
        with shared_stage([pages[i][1].timer for i in order], "prune", device):
            return dict(zip(order, prune_together(calls), strict=True))
    except Exception:
        if len(order) == 1:
            raise
    out: dict[int, PruneResult | Exception] = {}
    for i, call in zip(order, calls, strict=True):
        try:
            with pages[i][1].timer.stage("prune"):
                out[i] = prune_together([call])[0]
        except Exception as exc:
            out[i] = exc
    return out


def page_pruner(task: PageTask):
    """The page's pruner, at most at the cap the scheduler set under load (if any)."""
    cap = task.adaptation.cap if task.adaptation is not None and task.adaptation.cap < 1.0 else None
    return build_pruner(task.options.pruner, task.options.fixed_retention).capped(cap)


def prune_inputs(block: VisualBlock) -> tuple[torch.Tensor, ...]:
    return block.features, block.protected, block.newline, block.global_view
