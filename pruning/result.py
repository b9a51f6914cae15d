"""The typed result every pruner returns, and the layout rule they all share."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PruneResult:
    """What is left of one image's visual block after pruning.

    Attributes
    ----------
    features : Tensor, shape (n_kept, hidden)
        Kept tokens in their original (raster) order, in the input's dtype and device.
        For RTPrune the kept grid tokens carry the merged information of the dropped ones.
    kept_indices : LongTensor, shape (n_kept,)
        Ascending indices into the input block; ``features == input[kept_indices]`` for
        pruners that do not merge.
    keep_ratio : float
        The ratio r that decided K = floor(n_prunable * r), fixed or dynamic.
    n_tokens, n_prunable, n_kept_prunable : int
        Block size before pruning, prunable (grid) tokens in it, grid tokens kept.
    r_sim, r_txt : float or None
        The two terms of the dynamic ratio, when it was used.
    """

    features: torch.Tensor
    kept_indices: torch.Tensor
    keep_ratio: float
    n_tokens: int
    n_prunable: int
    n_kept_prunable: int
    r_sim: float | None = None
    r_txt: float | None = None

    @property
    def n_kept(self) -> int:
        """Tokens left in the block, protected ones included."""
        return int(self.kept_indices.numel())

    @property
    def retention(self) -> float:
        """Kept share of the whole block (newlines and separator included)."""
        return self.n_kept / self.n_tokens if self.n_tokens else 1.0


def drop_repeated_newlines(kept_indices: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """Drop a kept newline whose previous kept token is also a newline.

    A row whose grid tokens were all pruned would otherwise leave two row breaks in a
    row. Walking the kept tokens in order and dropping such newlines one by one gives the
    same answer as this vectorised form: a newline survives exactly when the token before
    it, in the kept sequence before any drop, is not a newline. The first newline of the
    block and the separator (not a newline) always survive.

    Parameters
    ----------
    kept_indices : LongTensor, shape (n_kept,)
        Ascending indices of the kept tokens.
    newline : BoolTensor, shape (n_tokens,)
        Which tokens of the block are row breaks.
    """
    is_newline = newline[kept_indices]  # (n_kept,)
    after_newline = torch.cat([is_newline.new_zeros(1), is_newline[:-1]])  # (n_kept,)
    return kept_indices[~(is_newline & after_newline)]
