"""RTPrune and baselines: faithfulness to the specification and the edge cases a service meets."""

from __future__ import annotations

import math

import pytest
import torch

from pruning import (
    PRUNERS,
    NormPrune,
    PruneResult,
    RTPrune,
    TokenPruner,
    build_pruner,
    keep_count,
    ot_merge,
    similarity_ratio,
    text_density_ratio,
    transport_plan,
)
from tests.helpers import v1_block_masks


def reference_ot_merge(x_keep, x_rem, dustbin=0.2, iters=100, beta=0.1):
    """The specification written as plain torch loops (SuperGlue's log_optimal_transport)."""
    k, p = x_keep.shape[0], x_rem.shape[0]
    n = k + p
    scores = torch.zeros(k + 1, p + 1, dtype=torch.float64)
    for i in range(k):
        for j in range(p):
            scores[i, j] = torch.dot(x_keep[i], x_rem[j]) / (x_keep[i].norm() * x_rem[j].norm())
    scores[k, :] = dustbin
    scores[:, p] = dustbin
    log_mu = torch.tensor([math.log(1 / n)] * k + [math.log(p / n)], dtype=torch.float64)
    log_nu = torch.tensor([math.log(1 / n)] * p + [math.log(k / n)], dtype=torch.float64)
    u = torch.zeros(k + 1, dtype=torch.float64)
    v = torch.zeros(p + 1, dtype=torch.float64)
    for _ in range(iters):
        for i in range(k + 1):  # row update first
            u[i] = log_mu[i] - torch.logsumexp(scores[i] + v, dim=0)
        for j in range(p + 1):
            v[j] = log_nu[j] - torch.logsumexp(scores[:, j] + u, dim=0)
    plan = torch.exp(scores + u[:, None] + v[None, :])
    t = n * plan[:k, :p]
    merged = x_keep.clone()
    for i in range(k):
        for j in range(p):
            merged[i] += beta * t[i, j] * x_rem[j]
    return merged


@pytest.mark.parametrize("k,p,hidden", [(5, 3, 8), (3, 9, 16), (12, 12, 32), (1, 6, 4)])
def test_ot_merge_matches_reference_loop(k, p, hidden):
    gen = torch.Generator().manual_seed(k * 100 + p)
    x_keep = torch.randn(k, hidden, generator=gen) * 3
    x_rem = torch.randn(p, hidden, generator=gen) * 3
    expected = reference_ot_merge(x_keep.double(), x_rem.double()).float()
    torch.testing.assert_close(ot_merge(x_keep, x_rem), expected, atol=1e-5, rtol=0)


def test_transport_plan_marginals_hold_with_dustbins():
    gen = torch.Generator().manual_seed(0)
    x_keep, x_rem = torch.randn(7, 16, generator=gen), torch.randn(5, 16, generator=gen)
    plan = transport_plan(x_keep, x_rem, n_iters=1000) / 12  # back to Pi without dustbins
    # each kept token has mass 1/N in total; without its dustbin share rows sum to at most that
    assert (plan.sum(1) <= 1 / 12 + 1e-6).all()
    assert (plan.sum(0) <= 1 / 12 + 1e-6).all()
    # with epsilon 1 the plan is close to uniform: each row of T sums to about P/N
    torch.testing.assert_close((12 * plan).sum(1), torch.full((7,), 5 / 12), atol=0.05, rtol=0)


def test_merge_weight_zero_equals_norm_baseline():
    x = torch.randn(50, 32)
    protected, newline = v1_block_masks(5, 9)
    x = torch.randn(protected.numel(), 32)
    a = RTPrune(0.5, merge_weight=0.0)(x, protected, newline)
    b = NormPrune(0.5)(x, protected, newline)
    torch.testing.assert_close(a.features, b.features)
    assert torch.equal(a.kept_indices, b.kept_indices)


def test_rtprune_keeps_highest_norm_tokens_and_merges_into_them():
    protected, newline = v1_block_masks(4, 5)
    x = torch.randn(protected.numel(), 16)
    result = RTPrune(0.5)(x, protected, newline)
    grid = (~protected).nonzero().squeeze(1)
    norms = x[grid].norm(dim=1)
    top = set(grid[norms.topk(10).indices].tolist())
    kept_grid = {i for i in result.kept_indices.tolist() if not protected[i]}
    assert kept_grid == top
    # merged features differ from the originals (stage 2 acted), protected ones do not
    changed = ~torch.isclose(result.features, x[result.kept_indices]).all(dim=1)
    assert changed.tolist() == [not protected[i] for i in result.kept_indices.tolist()]


def test_similarity_ratio_known_answers():
    same = torch.ones(10, 8) * 3
    assert similarity_ratio(same).item() == pytest.approx(0.0, abs=1e-6)
    orthogonal = torch.eye(8) * 5
    assert similarity_ratio(orthogonal).item() == pytest.approx(1.0, abs=1e-6)
    # half the pairs identical, half orthogonal: two groups of 2 identical vectors
    two_groups = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    # each token: one identical partner (cos^2 1) and two orthogonal (0) over N-1 = 3
    assert similarity_ratio(two_groups).item() == pytest.approx(1 - 1 / 3, abs=1e-6)


def test_text_density_blank_pages_count_patch_borders():
    white = torch.ones(3, 1024, 1024)
    assert text_density_ratio(white).item() == pytest.approx(252 / 4096, abs=1e-7)
    black = -torch.ones(3, 1024, 1024)
    assert text_density_ratio(black).item() == pytest.approx(252 / 4096, abs=1e-7)
    grey_pad = torch.full((3, 640, 640), 127 / 255 * 2 - 1)  # the 127 padding: too faint for edges
    assert text_density_ratio(grey_pad).item() == 0.0


def test_text_density_of_a_text_like_page():
    page = torch.ones(3, 512, 512)
    page[:, ::4, :] = -1.0  # thin dark lines every 4 px: every interior pixel sits next to an edge
    r = text_density_ratio(page).item()
    assert 0.5 < r <= 1.0
    # a patch with one vertical stroke: the columns on both sides of it are edges (rows 1..62);
    # on the stroke column itself both neighbours are equal, so its gradient is 0, which also
    # removes its two pixels from the 252 border pixels
    stroke = torch.ones(3, 64, 64)
    stroke[:, :, 32] = -1.0
    expected = (252 - 2 + 2 * 62) / 4096
    assert text_density_ratio(stroke).item() == pytest.approx(expected, abs=1e-7)


def reference_text_density(image: torch.Tensor) -> float:
    """The released code's loop: per 64x64 patch, gray, Sobel conv2d with its own zero padding, share > 0.2."""
    import torch.nn.functional as F

    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])[None, None]
    ky = kx.transpose(2, 3)
    gray = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    shares = []
    for top in range(0, gray.shape[0], 64):
        for left in range(0, gray.shape[1], 64):
            patch = gray[top : top + 64, left : left + 64][None, None]
            gx, gy = F.conv2d(patch, kx, padding=1), F.conv2d(patch, ky, padding=1)
            shares.append(((gx**2 + gy**2).sqrt() > 0.2).float().mean().item())
    return sum(shares) / len(shares)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_text_density_matches_the_per_patch_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    image = (torch.rand(3, 256, 320, generator=gen) > 0.7).float() * 2 - 1  # sparse "ink" on white
    image = image * torch.rand(1, 256, 320, generator=gen)  # graded strokes: magnitudes near the threshold too
    assert text_density_ratio(image).item() == pytest.approx(reference_text_density(image), abs=1e-6)


def test_dynamic_ratio_combines_terms_with_probabilistic_or():
    protected, newline = v1_block_masks(8, 8)
    x = torch.randn(protected.numel(), 64)
    image = torch.ones(3, 512, 512)
    result = RTPrune(None)(x, protected, newline, image)
    assert result.keep_ratio == pytest.approx(1 - (1 - result.r_sim) * (1 - result.r_txt))
    assert result.r_txt == pytest.approx(252 / 4096, abs=1e-6)
    assert result.n_kept_prunable == keep_count(64, result.keep_ratio)


def test_dynamic_ratio_without_image_is_a_clear_error():
    with pytest.raises(ValueError, match="needs the global view"):
        RTPrune(None)(torch.randn(5, 4))


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_ratio_one_is_identity(name):
    protected, newline = v1_block_masks(3, 4)
    x = torch.randn(protected.numel(), 8)
    result = build_pruner(name, 1.0)(x, protected, newline)
    assert torch.equal(result.features, x)
    assert result.kept_indices.tolist() == list(range(x.shape[0]))


@pytest.mark.parametrize("name", ["rtprune", "random", "norm", "divprune"])
def test_edge_cases(name):
    pruner = build_pruner(name, 0.01)
    one = pruner(torch.randn(1, 8))  # N of 1: nothing to drop
    assert one.n_kept == 1
    protected, newline = v1_block_masks(4, 6)
    x = torch.randn(protected.numel(), 8)
    tiny = pruner(x, protected, newline)  # K >= 1 even at 1%
    assert tiny.n_kept_prunable == 1
    all_protected = torch.ones(5, dtype=torch.bool)
    res = pruner(torch.randn(5, 8), all_protected, torch.zeros(5, dtype=torch.bool))
    assert res.n_kept == 5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_in_half_precision_out(dtype):
    protected, newline = v1_block_masks(6, 6)
    x = torch.randn(protected.numel(), 32).to(dtype)
    result = RTPrune(0.6)(x, protected, newline)
    assert result.features.dtype == dtype
    ref = RTPrune(0.6)(x.float(), protected, newline)
    assert torch.equal(result.kept_indices, ref.kept_indices)
    torch.testing.assert_close(result.features.float(), ref.features, atol=0.05, rtol=0.02)


def test_gundam_size_block():
    # 3x2 tiles of 10x10 (20 rows of 31) + 16x16 global (16 rows of 17) + separator = 893
    local_p, local_n = v1_block_masks(20, 30, with_separator=False)
    global_p, global_n = v1_block_masks(16, 16)
    protected, newline = torch.cat([local_p, global_p]), torch.cat([local_n, global_n])
    assert protected.numel() == 893
    x = torch.randn(893, 1280)
    result = RTPrune(None)(x, protected, newline, torch.rand(3, 1024, 1024) * 2 - 1)
    assert result.n_prunable == 600 + 256
    assert result.kept_indices[-1].item() == 892  # separator kept


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_are_rejected(bad):
    x = torch.randn(10, 4)
    x[3, 1] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        RTPrune(0.5)(x)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_out_of_range_ratio_is_rejected(ratio):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        RTPrune(ratio)


def test_unknown_pruner_names_the_choices():
    with pytest.raises(ValueError, match="rtprune, none, random, norm, divprune"):
        build_pruner("visionzip")


def test_random_is_seeded():
    x = torch.randn(100, 8)
    a, b = build_pruner("random", 0.3, seed=7)(x), build_pruner("random", 0.3, seed=7)(x)
    c = build_pruner("random", 0.3, seed=8)(x)
    assert torch.equal(a.kept_indices, b.kept_indices)
    assert not torch.equal(a.kept_indices, c.kept_indices)


def test_divprune_picks_diverse_tokens():
    # three tight clusters; keeping 3 must take one token from each
    centres = torch.eye(3, 16) * 10
    x = torch.cat([c + 0.01 * torch.randn(5, 16) for c in centres])
    kept = build_pruner("divprune", 3 / 15)(x).kept_indices
    assert sorted(i // 5 for i in kept.tolist()) == [0, 1, 2]


def test_empty_rows_leave_no_double_newline():
    protected, newline = v1_block_masks(4, 3)
    x = torch.ones(protected.numel(), 4)
    x[0:3] *= 10  # only row 0 has high-norm tokens
    result = NormPrune(3 / 12)(x, protected, newline)
    # row 0's 3 tokens + its newline; rows 1..3 empty: their newlines collapse; separator kept
    assert result.kept_indices.tolist() == [0, 1, 2, 3, 16]


def test_bad_masks_are_rejected():
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="subset of protected"):
        RTPrune(0.5)(x, torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        RTPrune(0.5)(x, torch.zeros(3, dtype=torch.bool))


# --- the batched, device-side path against the per-image walk ----------------------------------------------


def per_image_walk(pruner: RTPrune, *args) -> PruneResult:
    """The same pruner through the per-image reference walk (top-K, POT's log-domain solve, index lists)."""
    return TokenPruner.__call__(pruner, *args)


def gundam_block(seed: int, hidden: int = 64):
    local_p, local_n = v1_block_masks(20, 30, with_separator=False)
    global_p, global_n = v1_block_masks(16, 16)
    gen = torch.Generator().manual_seed(seed)
    protected = torch.cat([local_p, global_p])
    x = torch.randn(protected.numel(), hidden, generator=gen) * torch.rand(protected.numel(), 1, generator=gen) * 3
    return x, protected, torch.cat([local_n, global_n]), torch.rand(3, 1024, 1024, generator=gen) * 2 - 1


def large_block(seed: int, hidden: int = 64):
    protected, newline = v1_block_masks(20, 20)  # Large: 20 rows of 20 + newline, then the separator = 421
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(421, hidden, generator=gen) * torch.rand(421, 1, generator=gen) * 3
    return x, protected, newline, torch.rand(3, 1280, 1280, generator=gen) * 2 - 1


def assert_same_result(got, expected):
    assert torch.equal(got.kept_indices, expected.kept_indices)
    assert (got.n_kept_prunable, got.n_prunable, got.keep_ratio) == (
        expected.n_kept_prunable,
        expected.n_prunable,
        expected.keep_ratio,
    )
    scale = expected.features.float().abs().max()
    assert float((got.features.float() - expected.features.float()).abs().max()) <= 1e-4 * scale


@pytest.mark.parametrize("ratio", [0.8425, 0.5, 0.05, None])
@pytest.mark.parametrize("make", [large_block, gundam_block])
def test_the_batched_path_equals_the_per_image_walk(ratio, make):
    block = make(seed=3)
    assert_same_result(RTPrune(ratio)(*block), per_image_walk(RTPrune(ratio), *block))


def test_small_temperatures_solve_in_the_log_domain_with_the_same_plan():
    block = large_block(seed=5)
    pruner = RTPrune(0.7, temperature=0.02)  # scores / reg up to 50: past the exp domain's safe range
    assert_same_result(pruner(*block), per_image_walk(pruner, *block))


def test_pages_pruned_together_equal_each_pruned_alone():
    from pruning import prune_together

    calls = [
        (RTPrune(0.8425), *large_block(seed=1)),
        (RTPrune(None), *gundam_block(seed=2)),
        (build_pruner("norm", 0.5), *large_block(seed=3)),
        (RTPrune(0.3), *large_block(seed=4)),
        (RTPrune(None), *large_block(seed=5)),
    ]
    together = prune_together(calls)
    for (pruner, *args), result in zip(calls, together, strict=True):
        assert_same_result(result, pruner(*args))


def test_one_prune_call_reads_the_device_once_and_the_solve_never():
    from bench.common import count_host_reads
    from pruning import prune_together
    from pruning.batched import Options, transport_plans

    block = gundam_block(seed=7)
    with count_host_reads() as alone:
        RTPrune(None)(*block)
    with count_host_reads() as batched:
        prune_together([(RTPrune(r), *large_block(seed=i)) for i, r in enumerate([0.8425, None] * 8)])
    assert sum(alone.values()) == 1 and sum(batched.values()) == 1, (alone, batched)
    x = block[0][None].float()
    keep = torch.zeros(1, x.shape[1], dtype=torch.bool)
    keep[0, :100] = True
    with count_host_reads() as solve:
        transport_plans(x, keep, ~keep, torch.tensor([x.shape[1]]), Options())
    assert not solve
