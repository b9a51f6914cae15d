"""Continuous batching, as properties: whatever the join/leave schedule, a page decodes what it decodes alone.

Each example draws pages (modes, pruners, retentions, positions, guards all differ), the
decode step at which each joins the running batch, and pages that are cancelled part-way;
the pages that run to their end must give token for token the text they give alone
(tiny model, float32, greedy).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from service.engine import OcrOptions
from service.engine.decode.batch import NonFiniteLogits, RunningBatch
from service.engine.page import PageTask
from service.engine.stats import StageTimer
from tests.helpers import text_page

POOL = [
    (text_page((600, 800)), OcrOptions(mode="tiny", pruner="rtprune", retention="auto", max_new_tokens=9)),
    (text_page((1100, 800)), OcrOptions(mode="large", pruner="norm", retention=0.7, max_new_tokens=12)),
    (
        text_page((1100, 800)),
        OcrOptions(mode="gundam", pruner="none", max_new_tokens=10, ngram_size=2, ngram_window=6),
    ),
    (text_page((700, 700)), OcrOptions(mode="base", pruner="divprune", retention=0.5, max_new_tokens=6)),
    (
        text_page((500, 400)),
        OcrOptions(mode="tiny", pruner="random", retention=0.9, positions="compact", max_new_tokens=11, task="free"),
    ),
    (text_page((640, 640)), OcrOptions(mode="small", pruner="rtprune", retention=0.5, max_new_tokens=1)),
]


@pytest.fixture(scope="module")
def solo(tiny_engine) -> list[list[int]]:
    """Each pool page's tokens when it runs alone."""
    out = []
    for image, options in POOL:
        page = tiny_engine.prepare([PageTask(image, options, StageTimer())])[0]
        batch = tiny_engine.new_batch()
        batch.join([page.sequence])
        while batch.rows:
            batch.step()
        out.append(list(page.sequence.outcome.tokens))
    return out


def run_schedule(engine, arrivals: list[tuple[int, int]], cancels: dict[int, int]) -> dict[int, list[int] | None]:
    """Run pages joining at the given steps; ``cancels`` maps an arrival to the step it is removed at.
    Returns each arrival's tokens (None if it was cancelled before it finished)."""
    batch: RunningBatch = engine.new_batch()
    pages = {}
    order = sorted(range(len(arrivals)), key=lambda i: arrivals[i][1])
    step = 0
    while order or batch.rows:
        joining = [i for i in order if arrivals[i][1] <= step]
        if joining:
            order = [i for i in order if i not in joining]
            prepared = engine.prepare([PageTask(*POOL[arrivals[i][0]], StageTimer()) for i in joining])
            for i, page in zip(joining, prepared, strict=True):
                pages[i] = page
            batch.join([pages[i].sequence for i in joining])
        leaving = [pages[i].sequence for i, at in cancels.items() if at == step and i in pages]
        batch.remove([seq for seq in leaving if seq in batch.rows])
        for seq in leaving:
            if seq.outcome is None:
                seq.outcome = "cancelled"
        batch.step()
        step += 1
    return {
        i: list(page.sequence.outcome.tokens) if page.sequence.outcome != "cancelled" else None
        for i, page in pages.items()
    }


schedules = st.lists(st.tuples(st.integers(0, len(POOL) - 1), st.integers(0, 8)), min_size=2, max_size=5).flatmap(
    lambda arrivals: st.tuples(
        st.just(arrivals),
        st.dictionaries(st.integers(0, len(arrivals) - 1), st.integers(0, 10), max_size=2),
    )
)


@settings(max_examples=12)
@given(schedule=schedules)
def test_any_join_and_leave_schedule_gives_every_page_its_solo_text(tiny_engine, solo, schedule):
    arrivals, cancels = schedule
    tokens = run_schedule(tiny_engine, arrivals, cancels)
    finished = {i: t for i, t in tokens.items() if t is not None}
    assert len(finished) >= len(arrivals) - len(cancels)
    for i, got in finished.items():
        assert got == solo[arrivals[i][0]], f"arrival {i} (pool {arrivals[i][0]}) differs from its solo run"


def test_rows_really_joined_mid_decode(tiny_engine, solo):
    """The schedule above is not trivially sequential: a late page joins a batch that is decoding."""
    batch = tiny_engine.new_batch()
    first = tiny_engine.prepare([PageTask(*POOL[1], StageTimer())])[0]
    batch.join([first.sequence])
    batch.step()
    batch.step()
    late = tiny_engine.prepare([PageTask(*POOL[3], StageTimer())])[0]
    batch.join([late.sequence])
    assert len(batch.rows) == 2 and batch.width == max(first.sequence.prompt.length + 2, late.prompt_tokens)
    while batch.rows:
        batch.step()
    assert first.sequence.outcome.tokens == solo[1] and late.sequence.outcome.tokens == solo[3]


def test_nan_features_fail_their_page_alone(tiny_engine, solo):
    batch = tiny_engine.new_batch()
    good, bad = tiny_engine.prepare([PageTask(*POOL[0], StageTimer()), PageTask(*POOL[3], StageTimer())])
    with torch.inference_mode():
        bad.sequence.prompt.embeds[5:9] = float("nan")  # corrupt features that passed decoding
    batch.join([good.sequence])
    batch.step()
    batch.join([bad.sequence])
    while batch.rows:
        batch.step()
    assert isinstance(bad.sequence.outcome, NonFiniteLogits)
    assert good.sequence.outcome.tokens == solo[0]


def test_a_decode_step_makes_one_device_to_host_copy(tiny_engine, monkeypatch):
    """Greedy choice, n-gram bans and the NaN check run on the whole batch: one copy per step, not per row."""
    batch = tiny_engine.new_batch()
    pages = tiny_engine.prepare([PageTask(*POOL[i], StageTimer()) for i in (1, 2, 4)])
    batch.join([page.sequence for page in pages])
    copies = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            if self.device.type != "meta":
                copies.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    batch.step()
    assert copies == ["tolist"]


def test_left_padding_in_bf16_gives_no_nan_and_the_same_first_token(preset_cache):
    """bf16 on CPU: a page joined into a padded batch is finite and starts with the token it starts with alone."""
    from service.engine import OCREngine

    engine = OCREngine.load("tiny", device="cpu", dtype="bf16", cache_dir=preset_cache)
    items = [POOL[0], POOL[1], POOL[3]]  # prompts of three different lengths: every row but one is padded
    alone = []
    for item in items:
        page = engine.prepare([PageTask(*item, StageTimer())])[0]
        batch = engine.new_batch()
        batch.join([page.sequence])
        batch.step()
        alone.append(page.sequence)
    batch = engine.new_batch()
    pages = engine.prepare([PageTask(*item, StageTimer()) for item in items])
    batch.join([pages[0].sequence])
    batch.step()
    batch.join([page.sequence for page in pages[1:]])  # joins a running batch, left-padded
    batch.step()
    for solo, joined in zip(alone, [page.sequence for page in pages], strict=True):
        assert not isinstance(joined.outcome, NonFiniteLogits)
        assert joined.tokens[0] == solo.tokens[0]
