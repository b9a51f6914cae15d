"""Stage 2 of RTPrune: fold the dropped tokens into the kept ones by optimal transport.

The assignment of P dropped tokens to K kept tokens is an entropic optimal-transport plan
between the two sets, augmented SuperGlue-style with a dustbin row and column so that a
dropped token may match nothing. With the plan :math:`\\Pi` (dustbins removed)

.. math::

    T = N \\Pi, \\qquad x_{keep} \\leftarrow x_{keep} + \\beta \\, T \\, x_{rem},

where :math:`N = K + P` and :math:`\\beta` is the merge weight (0.1).

References
----------
.. [RTPrune] arXiv 2605.00392 (ICML 2026), released code ``utils.aggregate_ot``.
.. [SuperGlue] P.-E. Sarlin et al., "SuperGlue: Learning Feature Matching with Graph
   Neural Networks", CVPR 2020 (``log_optimal_transport``).
"""

from __future__ import annotations

import os

# POT imports every array library it finds (JAX, CuPy, TensorFlow) when it is imported, and GPU images
# often carry them: each costs start-up time and may take GPU memory. The merge uses the torch backend
# alone. (A value the user set wins.)
for _library in ("JAX", "CUPY", "TENSORFLOW"):
    os.environ.setdefault(f"POT_BACKEND_DISABLE_{_library}", "1")

import ot  # noqa: E402 - after the switches above
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def augment_with_dustbins(scores: torch.Tensor, dustbin_score: float) -> torch.Tensor:
    """Append one dustbin row and column (corner included) holding a constant score.

    Parameters
    ----------
    scores : Tensor, shape (k, p)

    Returns
    -------
    Tensor, shape (k + 1, p + 1)
    """
    return F.pad(scores, (0, 1, 0, 1), value=dustbin_score)


def dustbin_marginals(k: int, p: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column masses: 1/N per token, P/N and K/N for the two dustbins."""
    n = k + p
    a = torch.full((k + 1,), 1.0 / n, dtype=like.dtype, device=like.device)
    b = torch.full((p + 1,), 1.0 / n, dtype=like.dtype, device=like.device)
    a[-1] = p / n
    b[-1] = k / n
    return a, b


def transport_plan(
    x_keep: torch.Tensor,
    x_rem: torch.Tensor,
    *,
    dustbin_score: float = 0.2,
    reg: float = 1.0,
    n_iters: int = 100,
) -> torch.Tensor:
    """Scaled plan T = N * Pi between kept and removed tokens, dustbins dropped.

    The score is plain cosine similarity; with ``reg`` 1 (no temperature) the plan stays
    close to uniform, which is what the authors measured and what we reproduce.

    The Sinkhorn runs in POT's log domain on the tensors' own backend and device for
    exactly ``n_iters`` iterations (``stopThr=0`` never triggers the early stop). POT
    updates the column potential first; the released code updates rows first, so POT
    is handed the transposed problem, which makes its first update ours.

    Parameters
    ----------
    x_keep : Tensor, shape (k, hidden), float32
    x_rem : Tensor, shape (p, hidden), float32

    Returns
    -------
    Tensor, shape (k, p), float32
    """
    k, p = x_keep.shape[0], x_rem.shape[0]
    scores = F.normalize(x_keep, dim=-1) @ F.normalize(x_rem, dim=-1).T  # (k, p)
    augmented = augment_with_dustbins(scores, dustbin_score)  # (k+1, p+1)
    a, b = dustbin_marginals(k, p, augmented)
    # POT minimises <M, Pi> - reg * H(Pi); the cost of a match is minus its score.
    plan_t = ot.sinkhorn(
        b, a, -augmented.T / reg, 1.0, method="sinkhorn_log", numItermax=n_iters, stopThr=0.0, warn=False
    )  # (p+1, k+1)
    return (k + p) * plan_t.T[:k, :p]  # (k, p)


def ot_merge(
    x_keep: torch.Tensor,
    x_rem: torch.Tensor,
    *,
    merge_weight: float = 0.1,
    dustbin_score: float = 0.2,
    reg: float = 1.0,
    n_iters: int = 100,
) -> torch.Tensor:
    """Return x_keep + merge_weight * T @ x_rem, computed in float32, in x_keep's dtype.

    Parameters
    ----------
    x_keep : Tensor, shape (k, hidden)
    x_rem : Tensor, shape (p, hidden)

    Examples
    --------
    >>> x_keep = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> x_rem = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> ot_merge(x_keep, x_rem).shape
    torch.Size([2, 2])
    """
    if x_rem.shape[0] == 0 or merge_weight == 0.0:
        return x_keep
    keep32, rem32 = x_keep.float(), x_rem.float()
    plan = transport_plan(keep32, rem32, dustbin_score=dustbin_score, reg=reg, n_iters=n_iters)  # (k, p)
    return (keep32 + merge_weight * (plan @ rem32)).to(x_keep.dtype)  # (k, hidden)
