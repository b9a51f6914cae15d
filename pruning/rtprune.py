"""RTPrune: keep high-norm visual tokens, fold the rest into them by optimal transport."""

from __future__ import annotations

import torch

from .base import TokenPruner, check_shapes
from .batched import Block, Options, prune_blocks
from .norm_topk import top_k_by_norm
from .ot_merge import ot_merge
from .result import PruneResult


class RTPrune(TokenPruner):
    """RTPrune as released: stage 1 top-K by L2 norm, stage 2 Sinkhorn merge.

    A call runs the batched, device-side path (:mod:`.batched`), which reads the device once;
    :meth:`select` is the same two stages written per image, kept as the readable reference the
    tests compare it with. :func:`prune_together` prunes the pages of one admission at once.

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

    @property
    def options(self) -> Options:
        return Options(self.dustbin_score, self.temperature, self.sinkhorn_iters, self.merge_weight)

    def __call__(
        self,
        features: torch.Tensor,
        protected: torch.Tensor | None = None,
        newline: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> PruneResult:
        """Prune one image, called as every pruner is (:meth:`TokenPruner.__call__`), through the batched path."""
        return prune_blocks([self.block(features, protected, newline, image)], self.options)[0]

    def block(
        self,
        features: torch.Tensor,
        protected: torch.Tensor | None = None,
        newline: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> Block:
        """One image's checked inputs with this pruner's ratio, ready to be pruned with others."""
        protected, newline = check_shapes(features, protected, newline)
        if self.keep_ratio is None and image is None:
            self._resolve_ratio(features, image)  # raises the error that names what is missing
        return Block(features, protected, newline, image, self.keep_ratio, self.max_keep_ratio)

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


def prune_together(calls: list[tuple[TokenPruner, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Prune several images, each with its own pruner: ``(pruner, features, protected, newline, image)``.

    RTPrune images that share options, a device and a hidden size go through one batched call (one
    device read for all of them, whatever their ratios); other pruners run one by one. Results come
    back in the order of ``calls``."""
    results: list[PruneResult | None] = [None] * len(calls)
    groups: dict[tuple, list[int]] = {}
    rtprune: dict[int, RTPrune] = {}
    for i, (pruner, features, *_rest) in enumerate(calls):
        if isinstance(pruner, RTPrune):
            rtprune[i] = pruner
            groups.setdefault((pruner.options, features.device, features.shape[1]), []).append(i)
        else:
            results[i] = pruner(*calls[i][1:])
    for (options, _, _), members in groups.items():
        blocks = [rtprune[i].block(*calls[i][1:]) for i in members]
        for i, result in zip(members, prune_blocks(blocks, options), strict=True):
            results[i] = result
    return results
