"""The decode step does no wasted work: it writes one column per row in place, joins copy only the
joiners, the model builds no mask of its own, and the bans are ready before the forward is launched.
(Its speed is measured in bench/decode_step.py, never here.)"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from service.engine import OcrOptions
from service.engine.decode.batch import RunningBatch
from service.engine.page import PageTask
from service.engine.stats import StageTimer
from tests.helpers import text_page

PAGES = [
    (text_page((600, 800)), OcrOptions(mode="tiny", max_new_tokens=40, ngram_size=3, ngram_window=9)),
    (text_page((1100, 800)), OcrOptions(mode="base", max_new_tokens=40, ngram_size=0)),
    (text_page((500, 400)), OcrOptions(mode="small", max_new_tokens=40, ngram_size=0, task="free")),
]


def running(engine, items, layout="slots") -> tuple[RunningBatch, list]:
    batch = RunningBatch(engine.model, cache=layout)
    pages = engine.prepare([PageTask(image, options, StageTimer()) for image, options in items])
    batch.join([page.sequence for page in pages])
    return batch, pages


@contextmanager
def concatenations() -> Iterator[list[int]]:
    """The largest sequence length among the inputs of each ``cat`` run inside the block (the old cache
    concatenated whole layers; rotary embeddings concatenate one token's halves)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    lengths: list[int] = []

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.cat:
                lengths.append(max(t.shape[-2] if t.ndim >= 3 else 1 for t in args[0]))
            return func(*args, **(kwargs or {}))

    with Recording():
        yield lengths


def test_a_step_writes_each_rows_new_column_in_place_and_copies_no_cache(tiny_engine):
    batch, _ = running(tiny_engine, PAGES)
    batch.step()
    buffers = [layer.keys.data_ptr() for layer in batch._cache.layers]
    with concatenations() as lengths:
        batch.step()
    assert max(lengths) == 1  # only one token's tensors are ever concatenated
    assert [layer.keys.data_ptr() for layer in batch._cache.layers] == buffers
    padded, _ = running(tiny_engine, PAGES, layout="padded")
    padded.step()
    with concatenations() as old_lengths:
        padded.step()
    assert max(old_lengths) > 100  # what the step no longer does: every layer's whole cache, every step


def test_a_join_copies_only_the_joiners_and_leaves_running_rows_where_they_are(tiny_engine):
    batch, _ = running(tiny_engine, PAGES[:2])
    batch.step()
    before = [(layer.keys.data_ptr(), layer.keys[:2].clone()) for layer in batch._cache.layers]
    joiner = tiny_engine.prepare([PageTask(*PAGES[2], StageTimer())])[0]
    batch.join([joiner.sequence])
    for (pointer, rows), layer in zip(before, batch._cache.layers, strict=True):
        assert layer.keys.data_ptr() == pointer  # room was there: no new buffer
        torch.testing.assert_close(layer.keys[:2, :, : rows.shape[2]], rows, rtol=0, atol=0)


def test_the_model_builds_no_mask_of_its_own(tiny_engine, monkeypatch):
    """Every v1 layer is full attention; a sliding-window mask per forward (0.75 ms here) would be waste."""
    from transformers.models.unlimited_ocr import modeling_unlimited_ocr as modeling

    def forbidden(*args, **kwargs):
        raise AssertionError("the model built a mask of its own")

    monkeypatch.setattr(modeling, "create_causal_mask", forbidden)
    monkeypatch.setattr(modeling, "create_reference_sliding_window_causal_mask", forbidden)
    batch, _ = running(tiny_engine, PAGES)  # a padded prefill
    batch.step()  # padded rows
    alone, _ = running(tiny_engine, PAGES[:1])  # an unpadded prefill and step
    alone.step()


def test_the_bans_are_computed_before_the_forward_is_launched(tiny_engine, monkeypatch):
    events: list[str] = []
    batch, pages = running(tiny_engine, PAGES[:1])
    for _ in range(4):
        batch.step()
    guard = pages[0].sequence.guard
    original_banned, original_decoder = type(guard).banned, tiny_engine.model.decoder

    def banned(self, generated):
        events.append("bans")
        return original_banned(self, generated)

    def decoder(**kwargs):
        events.append("forward")
        return original_decoder(**kwargs)

    monkeypatch.setattr(type(guard), "banned", banned)
    monkeypatch.setattr(tiny_engine.model, "decoder", decoder)
    batch.step()
    assert events == ["bans", "forward"]


@pytest.mark.parametrize("layout", ["slots", "padded"])
def test_both_layouts_decode_the_same_tokens(tiny_engine, layout):
    batch, pages = running(tiny_engine, PAGES, layout)
    while batch.rows:
        batch.step()
    reference, reference_pages = running(tiny_engine, PAGES, "slots" if layout == "padded" else "padded")
    while reference.rows:
        reference.step()
    assert [p.sequence.tokens for p in pages] == [p.sequence.tokens for p in reference_pages]
