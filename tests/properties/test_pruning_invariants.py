"""Properties every pruner keeps on any block: counts, order, protection, layout, determinism."""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
import torch
from hypothesis import given

from pruning import PRUNERS, build_pruner, keep_count
from tests.helpers import v1_block_masks

blocks = st.tuples(
    st.integers(1, 8),  # rows
    st.integers(1, 8),  # grid tokens per row
    st.integers(0, 2**31 - 1),  # feature seed
)
ratios = st.floats(0.01, 1.0, allow_nan=False)
names = st.sampled_from(sorted(PRUNERS))


def make_block(rows, cols, seed, dtype=torch.float32):
    protected, newline = v1_block_masks(rows, cols)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(protected.numel(), 16, generator=gen) * torch.rand(protected.numel(), 1, generator=gen) * 4
    return x.to(dtype), protected, newline


@given(blocks, ratios, names)
def test_kept_tokens_obey_the_layout_rules(block, ratio, name):
    x, protected, newline = make_block(*block)
    result = build_pruner(name, ratio)(x, protected, newline)
    kept = result.kept_indices.tolist()
    assert kept == sorted(set(kept))  # ascending, unique
    grid_kept = [i for i in kept if not protected[i]]
    expected_k = result.n_prunable if name == "none" else keep_count(result.n_prunable, ratio)
    assert len(grid_kept) == expected_k
    # the separator and every newline not directly after another kept newline survive
    assert kept[-1] == x.shape[0] - 1
    is_nl = [bool(newline[i]) for i in kept]
    assert not any(a and b for a, b in itertools.pairwise(is_nl))  # no double newline
    assert newline.nonzero()[0].item() in kept  # the block's first newline always survives
    assert result.features.shape == (len(kept), x.shape[1])


@given(blocks, ratios, names, st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_dtype_device_and_determinism(block, ratio, name, dtype):
    x, protected, newline = make_block(*block, dtype=dtype)
    first = build_pruner(name, ratio)(x, protected, newline)
    again = build_pruner(name, ratio)(x, protected, newline)
    assert first.features.dtype == dtype and first.features.device == x.device
    assert torch.equal(first.kept_indices, again.kept_indices)
    assert torch.equal(first.features, again.features)


@given(blocks, names)
def test_ratio_one_is_identity(block, name):
    x, protected, newline = make_block(*block)
    result = build_pruner(name, 1.0)(x, protected, newline)
    assert torch.equal(result.features, x)


@given(blocks, ratios, st.sampled_from(["none", "random", "norm", "divprune"]))
def test_non_merging_pruners_return_input_rows(block, ratio, name):
    x, protected, newline = make_block(*block)
    result = build_pruner(name, ratio)(x, protected, newline)
    assert torch.equal(result.features, x[result.kept_indices])
