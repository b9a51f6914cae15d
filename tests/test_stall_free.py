"""Stall-free joining: while pages decode, a joining page's model work runs in pieces between their steps.

A reader of a streaming page sees the time between its tokens. A joining page's vision encoder runs one view
(global view or tile) at a time and its prompt is prefilled a chunk at a time, so the pause between two decode
steps is bounded by a piece, not by the largest page; and the pieces compute what one call would (fp32).
"""

from __future__ import annotations

import math

import pytest
import torch

from bench.pages import document_page
from service.engine import OcrOptions
from service.engine.decode.batch import RunningBatch
from service.engine.page import PageTask
from service.engine.preprocess import preprocess
from service.engine.stats import StageTimer
from tests.helpers import GUNDAM_PAGE, joining_work_between_steps, text_page


def run_pieces(pieces):
    """Drive a generator of pieces to its end: (pieces yielded, the value it returned)."""
    count = 0
    while True:
        try:
            next(pieces)
        except StopIteration as done:
            return count, done.value
        count += 1


def test_a_page_encoded_view_by_view_gets_the_block_of_one_vision_call(tiny_engine):
    page = preprocess(document_page(GUNDAM_PAGE, seed=1), "gundam", max_crops=6)
    whole = tiny_engine.model.encode([page])[0]
    count, pieces = run_pieces(tiny_engine.model.encode_in_pieces(page))
    sam_layers = len(tiny_engine.model.model.model.vision_tower.sam_encoder.layers)
    assert count == (1 + page.num_tiles) * sam_layers == 7 * 2  # each view, a SAM layer at a time
    assert torch.equal(pieces.protected, whole.protected) and torch.equal(pieces.newline, whole.newline)
    torch.testing.assert_close(pieces.features, whole.features, rtol=1e-5, atol=1e-5)  # a batched call's rounding


def test_the_vision_tower_run_a_layer_at_a_time_computes_what_it_does_whole(tiny_engine):
    view = preprocess(document_page(GUNDAM_PAGE, seed=2), "gundam", max_crops=6).global_view
    pixels = tiny_engine.model._on_device(view)[None]
    with torch.inference_mode():
        whole = tiny_engine.model.model.model.vision_tower(pixels).last_hidden_state
        _, pieces = run_pieces(tiny_engine.model._tower_in_pieces(pixels))
    assert torch.equal(pieces.last_hidden_state, whole)


def prepared_sequence(engine, options, image):
    page = engine.prepare([PageTask(image, options, StageTimer())])[0]
    return page, page.sequence


def decode_to_end(batch: RunningBatch) -> None:
    while batch.rows:
        batch.step()


@pytest.mark.parametrize("chunk", [37, 128])
def test_a_prompt_prefilled_in_chunks_decodes_the_tokens_one_prefill_does(tiny_engine, chunk):
    options = OcrOptions(mode="base", retention=1.0, max_new_tokens=24, ngram_size=0)
    image = text_page()
    _, whole = prepared_sequence(tiny_engine, options, image)
    batch = RunningBatch(tiny_engine.model)
    batch.join([whole])
    decode_to_end(batch)

    _, chunked = prepared_sequence(tiny_engine, options, image)
    batch = RunningBatch(tiny_engine.model)
    chunks = 1
    while not batch.prefill_chunk(chunked, chunk):
        chunks += 1
    assert chunks == math.ceil(chunked.prompt.length / chunk) > 1
    assert not batch.rows  # prefilled, not joined yet
    batch.join([chunked])
    decode_to_end(batch)
    assert chunked.outcome.tokens == whole.outcome.tokens and len(whole.outcome.tokens) == 24


def test_an_evicted_page_rejoins_in_chunks_and_goes_on_from_its_tokens(tiny_engine):
    options = OcrOptions(mode="base", pruner="rtprune", retention=0.7, max_new_tokens=16, ngram_size=0)
    alone = tiny_engine.run(text_page(), options)
    page, sequence = prepared_sequence(tiny_engine, options, text_page())
    batch = RunningBatch(tiny_engine.model)
    batch.join([sequence])
    for _ in range(5):
        batch.step()
    batch.remove([sequence])
    produced = list(sequence.tokens)
    while not batch.prefill_chunk(sequence, 50):  # its prompt and the 5 tokens it generated
        pass
    batch.join([sequence])
    decode_to_end(batch)
    assert sequence.tokens[: len(produced)] == produced
    assert tiny_engine.finish(page).text == alone.text


def test_a_page_that_leaves_during_its_chunked_prefill_is_forgotten(tiny_engine):
    options = OcrOptions(mode="base", max_new_tokens=4, ngram_size=0)
    _, sequence = prepared_sequence(tiny_engine, options, text_page())
    batch = RunningBatch(tiny_engine.model)
    assert not batch.prefill_chunk(sequence, 64)
    batch.remove([sequence])  # cancelled while prefilling: its partial cache goes with it
    chunks = 1
    while not batch.prefill_chunk(sequence, 64):
        chunks += 1
    assert chunks == math.ceil(sequence.prompt.length / 64)  # started again from its first chunk


def test_while_pages_decode_a_joining_page_runs_one_view_or_one_chunk_between_two_steps(tiny_engine):
    gundam = OcrOptions(mode="gundam", max_new_tokens=4, ngram_size=0)
    alone = tiny_engine.run(document_page(GUNDAM_PAGE, seed=9), gundam).text
    segments, result, measured = joining_work_between_steps(tiny_engine, join_budget_ms=1e-3, prefill_chunk_tokens=64)
    work = [event for segment in segments for event in segment]
    assert work.count("tower") == 7 and work.count("layer") == 7 * 2  # seven views, each SAM layer by layer
    assert work.count("chunk") == math.ceil(result.stats.prompt_tokens / 64) > 3
    pieces = [segment.count("layer") + segment.count("chunk") for segment in segments]
    assert max(pieces) == 1  # never two SAM layers or chunks between two decode steps
    assert result.text == alone  # the pieces computed what one call does (fp32)
    assert measured == 1e-3


def test_with_the_budget_off_a_joining_page_runs_whole_between_two_steps(tiny_engine):
    segments, _, _ = joining_work_between_steps(tiny_engine, join_budget_ms=0)
    joined = [segment for segment in segments if segment]
    assert len(joined) == 1 and joined[0].count("tower") == 2  # the global view's call, the tiles': all at once
    assert joined[0].count("layer") == 2 * 2


def test_the_measured_budget_follows_the_decode_step(tiny_engine):
    segments, _, measured = joining_work_between_steps(tiny_engine)  # the default: measured
    assert measured > 0
    assert len([segment for segment in segments if segment]) > 2  # the page's pieces spread over several steps


def test_with_only_job_pages_decoding_a_joining_page_runs_whole(tiny_engine):
    """Nobody reads a job page's tokens as they come: no pause to bound, so a joining page is not slowed."""
    segments, _, _ = joining_work_between_steps(tiny_engine, decoding_priority="batch", join_budget_ms=1e-3)
    joined = [segment for segment in segments if segment]
    assert len(joined) == 1 and joined[0].count("tower") == 2
