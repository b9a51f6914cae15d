"""Run prompts to the end: prefill them together, then decode greedily until every one stops.

Written out (rather than ``model.generate``) because the walk needs what ``generate`` does
not give: positions with gaps that continue from the unpruned length, per-sequence stop
rules, repetition guards and cancellation, and separate prefill/decode timings. The
step-level machinery is :class:`~.batch.RunningBatch`; this module is the simple driver
the CLI, the evaluation harness and the benchmarks use (a static batch). The HTTP
service's scheduler drives a :class:`~.batch.RunningBatch` itself, joining pages between
steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..assemble import PromptInputs
from ..model import OcrModel
from ..stats import StageTimer
from .batch import RunningBatch
from .contract import DecodeBatch
from .sequence import Cancelled, Generation, NGramGuard, Sequence, never


@torch.inference_mode()
def generate_batch(model: OcrModel, sequences: list[Sequence], batch: DecodeBatch | None = None) -> None:
    """Generate for every sequence; each one's ``outcome`` is set to a Generation or an exception.
    ``batch``: where they decode (default: the model's own decoder; the engine may pass a vLLM batch)."""
    batch = batch if batch is not None else RunningBatch(model)
    live = []
    for seq in sequences:
        problem = prompt_problem(model, seq.prompt)
        if problem:
            seq.outcome = ValueError(problem)
        else:
            live.append(seq)
    if not live:
        return
    batch.join(live)
    while batch.rows:
        stopped = [seq for seq in batch.rows if seq.should_stop()]
        for seq in stopped:
            seq.outcome = Cancelled("generation cancelled")
        batch.remove(stopped)
        batch.step()


def prompt_problem(model: OcrModel, prompt: PromptInputs) -> str | None:
    """Why ``prompt`` cannot generate on ``model`` (no position left), or None."""
    if prompt.next_position >= model.max_positions:
        return (
            f"the prompt already uses {prompt.next_position} of the model's "
            f"{model.max_positions} positions; nothing can be generated"
        )
    return None


def generate(
    model: OcrModel,
    prompt: PromptInputs,
    *,
    max_new_tokens: int,
    guard: NGramGuard,
    timer: StageTimer,
    should_stop: Callable[[], bool] | None = None,
) -> Generation:
    """Greedy decoding of one prompt until eos, ``max_new_tokens`` or the model's positions run out."""
    seq = Sequence(prompt, max_new_tokens, guard, timer, should_stop or never)
    generate_batch(model, [seq])
    if isinstance(seq.outcome, BaseException):
        raise seq.outcome
    assert seq.outcome is not None  # generate_batch runs every sequence to its end
    return seq.outcome
