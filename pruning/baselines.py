"""Baselines with RTPrune's call shape, K and protected-token rules, for comparison."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import TokenPruner
from .norm_topk import top_k_by_norm


class NoPrune(TokenPruner):
    """Keep everything (the unpruned model); the ratio is reported as 1."""

    name = "none"

    def __init__(self, keep_ratio: float | None = 1.0) -> None:
        super().__init__(1.0)

    def select(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, None]:  # pragma: no cover - K == N
        return torch.arange(x.shape[0], device=x.device), None


class RandomPrune(TokenPruner):
    """Keep K prunable tokens drawn uniformly at random; the same seed gives the same draw."""

    name = "random"

    def __init__(self, keep_ratio: float | None = None, *, seed: int = 0) -> None:
        super().__init__(keep_ratio)
        self.seed = seed

    def select(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, None]:
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        noise = torch.rand(x.shape[0], generator=generator, device=x.device)  # (N,)
        return noise.topk(k).indices.sort().values, None


class NormPrune(TokenPruner):
    """RTPrune's stage 1 alone: keep the K largest-norm tokens, merge nothing."""

    name = "norm"

    def select(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, None]:
        return top_k_by_norm(x, k)[0], None


class DivPrune(TokenPruner):
    """DivPrune: greedy max-min diversity on cosine distance, no merge.

    The first pick is the token whose nearest other token is farthest away (largest
    second-smallest distance, the smallest being its distance to itself); then, K - 1
    times, the token farthest from the selected set. The greedy steps depend on each
    other, so they run as a loop of K device operations without host transfers.

    References
    ----------
    .. [DivPrune] S. R. Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for
       Large Multimodal Models", CVPR 2025.
    """

    name = "divprune"

    def select(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, None]:
        n_tokens = x.shape[0]
        unit = F.normalize(x.float(), dim=-1)
        distance = 1.0 - unit @ unit.T  # (N, N)
        nearest_other = distance.topk(min(2, n_tokens), dim=1, largest=False).values[:, -1]  # (N,)
        chosen = torch.empty(k, dtype=torch.long, device=x.device)
        chosen[0] = nearest_other.argmax()
        min_distance = distance[chosen[0]].clone()  # (N,) distance to the selected set
        for step in range(1, k):
            min_distance.index_fill_(0, chosen[step - 1 : step], float("-inf"))
            chosen[step] = min_distance.argmax()
            min_distance = torch.minimum(min_distance, distance[chosen[step]])
        return chosen.sort().values, None
