"""Stage 1 of RTPrune: keep the K visual tokens with the largest L2 norm."""

from __future__ import annotations

import torch


def top_k_by_norm(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split tokens into the K largest by L2 norm and the rest, both in original order.

    Ties are broken by position (a stable sort), so the choice is deterministic on every
    device.

    Parameters
    ----------
    x : Tensor, shape (n_tokens, hidden)
    k : int
        Number of tokens to keep, 0 <= k <= n_tokens.

    Returns
    -------
    keep, rest : LongTensor, shapes (k,) and (n_tokens - k,)
        Ascending indices into ``x``.
    """
    n_tokens = x.shape[0]
    assert 0 <= k <= n_tokens, f"cannot keep {k} of {n_tokens} tokens"
    norms = x.float().norm(dim=-1)  # (N,)
    order = torch.sort(norms, descending=True, stable=True).indices  # (N,)
    keep = order[:k].sort().values  # (k,)
    rest = order[k:].sort().values  # (N - k,)
    return keep, rest
