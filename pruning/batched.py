"""RTPrune over several images at once, on their device, with one read of the results.

The per-image walk (:class:`~.base.TokenPruner`) is short but talks to the host between its
steps: the prunable indices (``nonzero``), K (a Python int), POT's convergence checks, the
kept indices. On a GPU each of those waits for the device, and the OT solve alone launches a
couple of thousand small kernels an image. Here every step is a masked tensor operation over a
padded batch ``(B, N, ...)``, so the pages of one admission are pruned together:

- prunable tokens, K = floor(n_prunable x r) and the top-K by norm are masks and ranks, not
  index lists; the dynamic ratio stays a tensor;
- the transport plan between kept and dropped tokens (dustbins included) is solved for every
  image in one batched, fixed-iteration Sinkhorn. POT's own solvers (``ot.sinkhorn``,
  ``ot.batch``) check convergence every ten iterations, a host sync each, so the iteration is
  written here, with POT's backend for the rest. The kernel is ``exp(score / reg)`` of cosine
  scores in [-1, 1], well inside float32 for the released ``reg = 1``, so the plain (exp-domain)
  iteration is safe: two batched matrix products an iteration. Small temperatures switch to the
  log domain;
- repeated newlines are dropped with a running maximum instead of a walk over indices;
- one ``tolist`` brings the counts, ratios and input checks to the host; the kept indices are
  then slices of a sort, and nothing else is read.

The numbers are the per-image walk's (the tests hold it to the reference loop and to the
per-image POT solve), so :class:`~.rtprune.RTPrune` runs through here for one image too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ot
import torch
import torch.nn.functional as F

from .base import NEWLINE_NOT_PROTECTED, NOT_FINITE
from .keep_ratio import combined_ratio, text_density_ratio
from .result import PruneResult

TINY = 1e-30  # a zero denominator meets a zero numerator only (a block with nothing to merge)
EXP_DOMAIN_MAX = 30.0  # largest |score| / reg solved in the exp domain (exp(30) ~ 1e13 is safe in float32)


@dataclass(frozen=True)
class Block:
    """One image's visual block, as :meth:`~.base.TokenPruner.__call__` takes it."""

    features: torch.Tensor  # (n_tokens, hidden)
    protected: torch.Tensor  # (n_tokens,) bool
    newline: torch.Tensor  # (n_tokens,) bool
    image: torch.Tensor | None = None  # (3, S, S), for the dynamic ratio
    keep_ratio: float | None = None  # None: the dynamic ratio
    max_keep_ratio: float | None = None  # a cap on the dynamic ratio (a server under load); None: none


@dataclass(frozen=True)
class Options:
    dustbin_score: float = 0.2
    reg: float = 1.0
    n_iters: int = 100
    merge_weight: float = 0.1


def prune_blocks(blocks: list[Block], options: Options = Options()) -> list[PruneResult]:
    """RTPrune every block; one host read for all of them. Blocks share a device and hidden size."""
    if not blocks:
        return []
    device = blocks[0].features.device
    x, valid, protected, newline = _pad(blocks, device)  # (B, N, C) float32, (B, N) bool x 3
    prunable = valid & ~protected
    n_prunable = prunable.sum(1)  # (B,)
    ratio, r_sim, r_txt = _ratios(blocks, x, prunable, n_prunable)  # (B,) float64 each
    k = _keep_count(n_prunable, ratio)  # (B,)
    keep = prunable & (_norm_rank(x, prunable) < k[:, None])  # (B, N): the top-K grid tokens
    rest = prunable & ~keep
    merged = _merge(x, keep, rest, n_prunable, options)  # (B, N, C): kept rows merged
    kept = _drop_repeated_newlines((protected | keep) & valid, newline)  # (B, N)
    n_kept = kept.sum(1)
    checks = torch.stack([torch.isfinite(x).flatten(1).all(1), ~(newline & ~protected).any(1)], 1)
    host = torch.cat(  # the call's one read
        [torch.stack([n_kept, k, n_prunable], 1).double(), torch.stack([ratio, r_sim, r_txt], 1), checks.double()], 1
    ).tolist()
    _raise_on_bad_input(host)
    order = torch.sort(torch.where(kept, _positions(x), x.shape[1]), dim=1).values  # kept indices first
    results = []
    for b, (count, kept_grid, n_grid, r, sim, txt, _, _) in enumerate(host):
        block = blocks[b]
        dynamic = block.keep_ratio is None
        if kept_grid == n_grid:  # nothing pruned: exactly the input, as the per-image walk returns it
            features, indices = block.features, torch.arange(block.features.shape[0], device=device)
        else:
            indices = order[b, : int(count)]
            features = merged[b, indices].to(block.features.dtype)
        results.append(
            PruneResult(
                features,
                indices,
                r,
                block.features.shape[0],
                int(n_grid),
                int(kept_grid),
                sim if dynamic else None,
                txt if dynamic else None,
            )
        )
    return results


def _pad(blocks: list[Block], device: torch.device) -> tuple[torch.Tensor, ...]:
    width = max(block.features.shape[0] for block in blocks)
    hidden = blocks[0].features.shape[1]
    x = torch.zeros(len(blocks), width, hidden, device=device)
    masks = torch.zeros(3, len(blocks), width, dtype=torch.bool, device=device)
    for b, block in enumerate(blocks):
        n = block.features.shape[0]
        x[b, :n] = block.features.float()
        masks[0, b, :n] = True
        masks[1, b, :n] = block.protected
        masks[2, b, :n] = block.newline
    return x, masks[0], masks[1], masks[2]


def _positions(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)


def _ratios(
    blocks: list[Block], x: torch.Tensor, prunable: torch.Tensor, n_prunable: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each block's keep ratio (fixed, or 1 - (1 - r_sim)(1 - r_txt)) and the dynamic terms, float64."""
    fixed = torch.tensor([b.keep_ratio or 0.0 for b in blocks], dtype=torch.float64, device=x.device)
    dynamic = [b.keep_ratio is None for b in blocks]
    r_sim = torch.zeros(len(blocks), dtype=torch.float64, device=x.device)
    r_txt = torch.zeros_like(r_sim)
    if any(dynamic):
        # each block on its own, unpadded slice: the same reductions as when it is pruned alone, so a page's
        # ratio (and K) does not depend on which pages it was batched with
        sim, txt = [], []
        for i, block in enumerate(blocks):
            n = block.features.shape[0]
            one = _similarity_ratio(x[i : i + 1, :n].contiguous(), prunable[i : i + 1, :n], n_prunable[i : i + 1])[0]
            sim.append(one if dynamic[i] else r_sim[i].float())
            image = block.image
            txt.append(text_density_ratio(image).to(x.device) if dynamic[i] and image is not None else r_txt[i].float())
        r_sim = torch.stack(sim).double().clamp(0.0, 1.0)
        r_txt = torch.stack(txt).double()
        # float32 terms, combined in float64: what the per-image walk computes in Python after reading them
        r_dyn = combined_ratio(r_sim, r_txt)
        if any(b.max_keep_ratio is not None for b in blocks):  # a server under load: no extra copy otherwise
            caps = [1.0 if b.max_keep_ratio is None else b.max_keep_ratio for b in blocks]
            r_dyn = torch.minimum(r_dyn, torch.tensor(caps, dtype=torch.float64, device=x.device))
        flags = torch.tensor(dynamic, device=x.device)
        return torch.where(flags, r_dyn, fixed), r_sim, r_txt
    return fixed, r_sim, r_txt


def _similarity_ratio(x: torch.Tensor, prunable: torch.Tensor, n_prunable: torch.Tensor) -> torch.Tensor:
    """r_sim of each block over its prunable tokens (see :func:`~.keep_ratio.similarity_ratio`)."""
    unit = F.normalize(x, dim=-1) * prunable[..., None]  # (B, N, C); others zero
    cos_sq = (unit @ unit.transpose(1, 2)).square()  # (B, N, N)
    off_diagonal = cos_sq.sum(2) - cos_sq.diagonal(dim1=1, dim2=2)  # (B, N)
    n = n_prunable.float()
    mean = (off_diagonal / (n - 1).clamp(min=1)[:, None] * prunable).sum(1) / n.clamp(min=1)
    return torch.where(n_prunable < 2, torch.ones_like(mean), 1.0 - mean)


def _keep_count(n_prunable: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """K = floor(N r) in float64 (as Python computes it), at least 1 when N > 0, at most N."""
    k = torch.floor(n_prunable.double() * ratio).long()
    return torch.minimum(n_prunable, torch.clamp(k, min=1)) * (n_prunable > 0)


def _norm_rank(x: torch.Tensor, prunable: torch.Tensor) -> torch.Tensor:
    """Each token's place among its block's prunable tokens by L2 norm, largest first, ties by position
    (a stable sort); non-prunable tokens rank last."""
    norms = torch.where(prunable, x.norm(dim=-1), -math.inf)  # (B, N)
    order = torch.sort(norms, dim=1, descending=True, stable=True).indices
    return torch.argsort(order, dim=1)  # rank of each position


def _merge(
    x: torch.Tensor, keep: torch.Tensor, rest: torch.Tensor, n_prunable: torch.Tensor, options: Options
) -> torch.Tensor:
    """x_keep + beta T x_rem for the kept rows of every block (T = N Pi, the dustbin-augmented plan)."""
    if options.merge_weight == 0.0:
        return x
    plan = transport_plans(x, keep, rest, n_prunable, options)  # (B, N, N)
    return x + options.merge_weight * (plan @ (x * rest[..., None]))


def transport_plans(
    x: torch.Tensor, keep: torch.Tensor, rest: torch.Tensor, n_prunable: torch.Tensor, options: Options
) -> torch.Tensor:
    """T = (K + P) Pi between each block's kept (rows) and dropped (columns) tokens, (B, N, N), zero
    elsewhere; the rows-first Sinkhorn of the released code (SuperGlue's ``log_optimal_transport``)."""
    batch, width, _ = x.shape
    unit = F.normalize(x, dim=-1)
    scores = F.pad(unit @ unit.transpose(1, 2), (0, 1, 0, 1), value=options.dustbin_score)  # (B, N+1, N+1)
    n = n_prunable.clamp(min=1).float()[:, None]  # (B, 1)
    k_count, p_count = keep.sum(1, keepdim=True).float(), rest.sum(1, keepdim=True).float()
    a = torch.cat([keep.float() / n, p_count / n], 1)  # (B, N+1): 1/N per kept token, P/N for the dustbin
    b = torch.cat([rest.float() / n, k_count / n], 1)  # (B, N+1): 1/N per dropped token, K/N for the dustbin
    rows = torch.cat([keep, torch.ones_like(keep[:, :1])], 1)  # kept tokens and the dustbin
    cols = torch.cat([rest, torch.ones_like(rest[:, :1])], 1)
    # a row or column of zero mass keeps its dustbin entry, so no update ever divides zero by zero
    live = (rows[:, :, None] & cols[:, None, :]) | (rows[:, :, None] | cols[:, None, :]) & _dustbin_mask(width, x)
    nx = ot.backend.get_backend(scores)
    if 1.0 / options.reg <= EXP_DOMAIN_MAX:
        # u and v as column vectors, one batched matrix product per half step: POT's backend offers batched
        # products only through einsum, which is several operators a call
        kernel = nx.exp(scores / options.reg) * live  # (B, N+1, N+1)
        kernel_t = kernel.transpose(1, 2).contiguous()
        a, b = a[..., None], b[..., None]  # (B, N+1, 1)
        v = torch.ones_like(b)
        for _ in range(options.n_iters):
            u = a / torch.bmm(kernel, v).clamp_(min=TINY)  # a row of zero mass stays 0
            v = b / torch.bmm(kernel_t, u).clamp_(min=TINY)
        plan = u * kernel * v.transpose(1, 2)
    else:
        log_kernel = torch.where(live, scores / options.reg, -math.inf)
        log_a, log_b = nx.log(a), nx.log(b)
        u, v = nx.zeros((batch, width + 1), type_as=scores), nx.zeros((batch, width + 1), type_as=scores)
        for _ in range(options.n_iters):
            u = log_a - nx.logsumexp(log_kernel + v[:, None, :], axis=2)
            v = log_b - nx.logsumexp(log_kernel + u[:, :, None], axis=1)
        plan = nx.exp(log_kernel + u[:, :, None] + v[:, None, :])
    return n[:, :, None] * plan[:, :width, :width]


def _dustbin_mask(width: int, like: torch.Tensor) -> torch.Tensor:
    """(1, N+1, N+1): the dustbin row and column."""
    mask = torch.zeros(1, width + 1, width + 1, dtype=torch.bool, device=like.device)
    mask[:, width, :] = True
    mask[:, :, width] = True
    return mask


def _drop_repeated_newlines(kept: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """Drop a kept newline whose previous kept token is a newline (see :func:`~.result.drop_repeated_newlines`)."""
    positions = _positions(kept)
    last_kept = torch.cummax(torch.where(kept, positions, -1), dim=1).values  # (B, N)
    previous = F.pad(last_kept[:, :-1], (1, 0), value=-1)  # the last kept position before each one
    after_newline = (previous >= 0) & newline.gather(1, previous.clamp(min=0))
    return kept & ~(newline & after_newline)


def _raise_on_bad_input(host: list[list[float]]) -> None:
    for row in host:
        finite, subset = row[-2:]
        if not finite:
            raise ValueError(NOT_FINITE)
        if not subset:
            raise ValueError(NEWLINE_NOT_PROTECTED)
