"""How many pages decode at once: on a GPU, measured at start-up; on the CPU, a constant.

On a GPU a decode step costs nearly the same from one row to a hundred or more (the mixture of
experts reads every expert's weights whatever the batch), so a small constant cap leaves the device
idle; on a CPU the step grows with the rows and a cap of 32 is plenty. The measured cap is the
largest number of rows whose step takes at most ``STEP_GROWTH`` times the one-row step — pages each
wait at most that much longer per token, and the batch decodes that many times more pages — within
what the KV budget holds at a typical page width, and at most ``MAX_ROWS``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from service.engine import OCREngine
from service.engine.assemble import PromptInputs
from service.engine.decode.contract import DecodeBatch
from service.engine.decode.sequence import NGramGuard, Sequence
from service.engine.stats import StageTimer

log = logging.getLogger(__name__)

CPU_ROWS = 32  # the cap on a CPU (and wherever nothing is measured)
# Decoding on vLLM: as many pages as vLLM itself batches by default (its max_num_seqs); vLLM schedules and
# budgets them, so nothing here is measured (the local decoder layers are released anyway).
VLLM_ROWS = 256
CANDIDATE_ROWS = (1, 8, 32, 64, 128, 256)
STEP_GROWTH = 2.0  # a step may take this many times the one-row step
TYPICAL_WIDTH = 1024  # tokens a row holds when the KV budget bounds the rows (a Large page and its text)
MAX_ROWS = 256


def choose_row_cap(step_ms: Callable[[int], float], kv_budget: int | None) -> tuple[int, dict[int, float]]:
    """The largest candidate whose step stays within ``STEP_GROWTH`` x the one-row step and whose rows fit
    the KV budget at a typical width; and the curve it was chosen from (rows -> ms per step)."""
    fits = MAX_ROWS if kv_budget is None else max(1, kv_budget // TYPICAL_WIDTH)
    curve = {1: step_ms(1)}
    cap = 1
    for rows in CANDIDATE_ROWS[1:]:
        if rows > min(fits, MAX_ROWS):
            break
        curve[rows] = step_ms(rows)
        if curve[rows] > STEP_GROWTH * curve[1]:
            break
        cap = rows
    return cap, curve


def default_row_cap(engine: OCREngine, kv_budget: int | None) -> int:
    """The row cap for ``engine``'s device: ``VLLM_ROWS`` when a vLLM server decodes (its own limits apply),
    measured on a GPU (a few synthetic steps after warm-up, well under a second), ``CPU_ROWS`` elsewhere."""
    if engine.decoder is not None:
        return VLLM_ROWS
    if engine.device.type != "cuda":
        return CPU_ROWS
    cap, curve = choose_row_cap(lambda rows: measure_step_ms(engine, rows), kv_budget)
    log.info("row cap %d from the decode step's cost (ms per step by rows: %s)", cap, curve)
    return cap


@torch.inference_mode()
def measure_step_ms(engine: OCREngine, rows: int, width: int = 256, steps: int = 3) -> float:
    """Median wall time of a decode step of ``rows`` synthetic rows ``width`` tokens wide, on the device."""
    batch = engine.new_batch()  # the decoder the service runs (only ever the in-process one here: see above)
    sequences = synthetic_sequences(engine, rows, width, budget=steps + 3)
    for start in range(0, rows, 32):
        batch.join(sequences[start : start + 32])
    times = step_times_ms(engine, batch, steps)
    batch.remove(list(batch.rows))
    return sorted(times)[len(times) // 2]


def synthetic_sequences(engine: OCREngine, rows: int, width: int, budget: int) -> list[Sequence]:
    """``rows`` prompts of ``width`` tokens for timing decode steps (zero embeddings: a step's cost does not
    depend on the values), each allowed ``budget`` new tokens."""
    zero = torch.zeros(1, engine.model.text_config.hidden_size, device=engine.device, dtype=engine.model.dtype)
    positions = torch.arange(width, device=engine.device)
    prompt = PromptInputs(zero.expand(width, -1), positions, width)
    return [Sequence(prompt, budget, NGramGuard(0, 0), StageTimer()) for _ in range(rows)]


def step_times_ms(engine: OCREngine, batch: DecodeBatch, steps: int) -> list[float]:
    """Wall time of each of ``steps`` decode steps after a warm one, the device synchronised around each."""
    timer = StageTimer(engine.device)
    batch.step()  # warm
    times = []
    for _ in range(steps):
        before = timer.ms["decode"]
        with timer.stage("decode"):
            batch.step()
        times.append(timer.ms["decode"] - before)
    return times
