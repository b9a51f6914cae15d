"""RTPrune: keep high-norm visual tokens, fold the rest into them by optimal transport."""

from __future__ import annotations

import torch

from .base import TokenPruner
from .norm_topk import top_k_by_norm
from .ot_merge import ot_merge


class RTPrune(TokenPruner):
    """RTPrune as released: stage 1 top-K by L2 norm, stage 2 Sinkhorn merge.

    Parameters
    ----------
    keep_ratio : float in (0, 1], or None
        ``None`` (default) is the paper's dynamic per-image ratio.
    dustbin_score : float
        Score of the dustbin row, column and corner (0.2 as released).
    sinkhorn_iters : int
        Log-domain Sinkhorn iterations, no early stop (100 as released).
    merge_weight : float
        Weight beta of the merged information (0.1 as released). 0 turns stage 2 off.
    temperature : float
        *Option*, not in the release: entropic regulariser on the cosine scores
        (1.0 = the released behaviour, where the plan is close to uniform).

    Examples
    --------
    >>> pruner = RTPrune(keep_ratio=0.5)
    >>> features = torch.randn(6, 4)
    >>> result = pruner(features)
    >>> result.features.shape, result.kept_indices.tolist() == sorted(result.kept_indices.tolist())
    (torch.Size([3, 4]), True)
    """

    name = "rtprune"

    def __init__(
        self,
        keep_ratio: float | None = None,
        *,
        dustbin_score: float = 0.2,
        sinkhorn_iters: int = 100,
        merge_weight: float = 0.1,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(keep_ratio)
        if sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be at least 1, got {sinkhorn_iters}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.dustbin_score = dustbin_score
        self.sinkhorn_iters = sinkhorn_iters
        self.merge_weight = merge_weight
        self.temperature = temperature

    def select(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        keep, rest = top_k_by_norm(x, k)
        merged = ot_merge(
            x[keep],
            x[rest],
            merge_weight=self.merge_weight,
            dustbin_score=self.dustbin_score,
            reg=self.temperature,
            n_iters=self.sinkhorn_iters,
        )
        return keep, merged
