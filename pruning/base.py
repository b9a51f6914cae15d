"""The call contract every pruner shares: masks, ratio, K, layout rules, result."""

from __future__ import annotations

from typing import ClassVar

import torch

from .keep_ratio import dynamic_keep_ratio, keep_count, validate_keep_ratio
from .result import PruneResult, drop_repeated_newlines


class TokenPruner:
    """Prune one image's visual block; subclasses only choose (and maybe merge) tokens.

    The shared rules live here so every pruner obeys them the same way: protected tokens
    (row newlines, the view separator) are never pruned; K = floor(n_prunable * r) with r
    fixed or dynamic; kept tokens stay in raster order; a newline directly after another
    kept newline is dropped.

    Parameters
    ----------
    keep_ratio : float in (0, 1], or None
        Share of prunable (grid) tokens to keep. ``None`` selects RTPrune's dynamic ratio,
        which needs the global view passed as ``image``.

    ``max_keep_ratio`` (an attribute, default None) caps the dynamic ratio: a server under load
    keeps RTPrune's per-image choice but never above the cap (see :meth:`capped`).
    """

    name: ClassVar[str] = "base"
    max_keep_ratio: float | None = None

    def __init__(self, keep_ratio: float | None = None) -> None:
        validate_keep_ratio(keep_ratio)
        self.keep_ratio = keep_ratio

    def capped(self, max_keep_ratio: float | None) -> TokenPruner:
        """This pruner with its ratio at most ``max_keep_ratio``: a fixed ratio is lowered to it, the dynamic
        ratio is computed as usual and then capped (None: no cap). Returns ``self``."""
        validate_keep_ratio(max_keep_ratio)
        if max_keep_ratio is not None and self.keep_ratio is not None:
            self.keep_ratio = min(self.keep_ratio, max_keep_ratio)
        self.max_keep_ratio = max_keep_ratio
        return self

    def __repr__(self) -> str:
        ratio = "auto" if self.keep_ratio is None else self.keep_ratio
        return f"{type(self).__name__}(keep_ratio={ratio})"

    def select(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Choose k of the prunable tokens ``x`` (n_prunable, hidden).

        Returns the ascending local indices of the kept tokens and, for pruners that merge,
        their new features (k, hidden); ``None`` keeps the original features.
        """
        raise NotImplementedError

    def __call__(
        self,
        features: torch.Tensor,
        protected: torch.Tensor | None = None,
        newline: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> PruneResult:
        """Prune ``features`` (n_tokens, hidden); see the class docstring for the rules.

        Parameters
        ----------
        features : Tensor, shape (n_tokens, hidden)
            Post-projector visual block, any float dtype, any device.
        protected : BoolTensor, shape (n_tokens,), optional
            Tokens that are never pruned.
        newline : BoolTensor, shape (n_tokens,), optional
            Row-break tokens, a subset of ``protected``.
        image : Tensor, shape (3, S, S), optional
            Global view in [-1, 1]; required for the dynamic ratio.
        """
        protected, newline = check_shapes(features, protected, newline)
        _check_values(features, protected, newline)
        n_tokens = features.shape[0]
        prunable = (~protected).nonzero().squeeze(1)  # (n_prunable,)
        x = features[prunable]  # (n_prunable, hidden)
        keep_ratio, r_sim, r_txt = self._resolve_ratio(x, image)
        k = keep_count(x.shape[0], keep_ratio)

        def result(out: torch.Tensor, kept: torch.Tensor) -> PruneResult:
            return PruneResult(out, kept, keep_ratio, n_tokens, x.shape[0], k, r_sim, r_txt)

        if k == x.shape[0]:  # nothing to prune: exactly the input
            return result(features, torch.arange(n_tokens, device=features.device))

        local_keep, merged = self.select(x, k)
        kept_prunable = prunable[local_keep]  # (k,)
        out = features
        if merged is not None:
            out = features.index_copy(0, kept_prunable, merged.to(features.dtype))
        kept_mask = protected.index_fill(0, kept_prunable, True)  # (n_tokens,)
        kept = drop_repeated_newlines(kept_mask.nonzero().squeeze(1), newline)  # (n_kept,)
        return result(out[kept], kept)

    def _resolve_ratio(self, x: torch.Tensor, image: torch.Tensor | None) -> tuple[float, float | None, float | None]:
        if self.keep_ratio is not None:
            return float(self.keep_ratio), None, None
        if image is None:
            raise ValueError(
                "the dynamic keep ratio (keep_ratio=None) needs the global view: pass image=<(3, S, S) tensor "
                "in [-1, 1]>, or give a fixed keep_ratio"
            )
        ratio, r_sim, r_txt = dynamic_keep_ratio(x, image)
        return (min(ratio, self.max_keep_ratio) if self.max_keep_ratio is not None else ratio), r_sim, r_txt


def check_shapes(
    features: torch.Tensor, protected: torch.Tensor | None, newline: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes and dtypes (known on the host: no device read), with messages that say what was
    expected; the masks, defaulted to none, on the features' device."""
    if features.ndim != 2 or not features.is_floating_point():
        raise ValueError(
            f"features must be a float tensor of shape (n_tokens, hidden), got {features.dtype} {tuple(features.shape)}"
        )
    n_tokens = features.shape[0]
    if n_tokens == 0:
        raise ValueError("features is empty: a visual block has at least one token")
    masks = []
    for name, mask in (("protected", protected), ("newline", newline)):
        if mask is None:
            mask = torch.zeros(n_tokens, dtype=torch.bool, device=features.device)
        elif mask.shape != (n_tokens,) or mask.dtype != torch.bool:
            raise ValueError(
                f"{name} must be a bool tensor of shape ({n_tokens},), got {mask.dtype} {tuple(mask.shape)}"
            )
        masks.append(mask.to(features.device))
    protected, newline = masks
    return protected, newline


def _check_values(features: torch.Tensor, protected: torch.Tensor, newline: torch.Tensor) -> None:
    """Finite features, newlines among the protected tokens: one host transfer for both."""
    finite, newline_subset = torch.stack([torch.isfinite(features).all(), ~(newline & ~protected).any()]).tolist()
    if not finite:
        raise ValueError(NOT_FINITE)
    if not newline_subset:
        raise ValueError(NEWLINE_NOT_PROTECTED)


NOT_FINITE = "features contain NaN or infinite values; the vision encoder output is corrupt"
NEWLINE_NOT_PROTECTED = "newline must be a subset of protected: row breaks are never pruned"
