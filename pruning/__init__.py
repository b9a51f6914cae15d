"""Model-agnostic visual-token pruning on tensors: RTPrune and baselines.

Tensors in, tensors out: nothing here knows about models, HTTP or settings.

>>> import torch
>>> from pruning import RTPrune
>>> result = RTPrune(keep_ratio=0.5)(torch.randn(8, 16))
>>> result.n_kept
4
"""

from .base import TokenPruner
from .baselines import DivPrune, NoPrune, NormPrune, RandomPrune
from .keep_ratio import combined_ratio, dynamic_keep_ratio, keep_count, similarity_ratio, text_density_ratio
from .ot_merge import ot_merge, transport_plan
from .registry import PRUNERS, build_pruner
from .result import PruneResult, drop_repeated_newlines
from .rtprune import RTPrune, prune_together

__all__ = [
    "PRUNERS",
    "DivPrune",
    "NoPrune",
    "NormPrune",
    "PruneResult",
    "RTPrune",
    "RandomPrune",
    "TokenPruner",
    "build_pruner",
    "combined_ratio",
    "drop_repeated_newlines",
    "dynamic_keep_ratio",
    "keep_count",
    "ot_merge",
    "prune_together",
    "similarity_ratio",
    "text_density_ratio",
    "transport_plan",
]
