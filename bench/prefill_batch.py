"""Where pruning pays: LLM prefill of B pages at once, retention 1.0 / 0.8425 / 0.5, side by side.

    python bench/prefill.py --batches 1,4,8,16 --dtype fp32 --out bench/results/prefill_batch_cpu_fp32.json
    python bench/prefill.py --batches 1,4,8,16 --device cuda --out bench/results/prefill_batch_cuda.json

At batch 1 on a small CPU a decoder step reads every expert's weights whatever the prompt
length, so a shorter prompt saves little; with more pages per forward the work per weight
read grows and the saving should approach the prompt-length ratio. This measures it with
the served functions: one Large page is encoded once (the vision encoder does not depend
on retention), each setting prunes and assembles with :meth:`OCREngine.assemble_page`, and
the timed call is :meth:`RunningBatch.join` — the left-padded batched prefill, LM head and
first-token choice the scheduler runs. Every round runs every (B, retention) once in a
rotated order; speedups are medians of per-round ratios to retention 1.0 at the same B.
"""

from __future__ import annotations

import statistics

import torch

from bench.common import summarize
from bench.pages import document_page
from service.engine import OCREngine, OcrOptions
from service.engine.page import PageTask
from service.engine.stats import StageTimer

RETENTIONS = (1.0, 0.8425, 0.5)


def prefill_ms(engine: OCREngine, block, batch: int, retention: float) -> tuple[float, int]:
    """Time one batched prefill of ``batch`` copies of ``block`` at ``retention``; (ms, prompt tokens)."""
    options = OcrOptions(mode="large", pruner="none" if retention == 1.0 else "rtprune", retention=retention)
    pages = [engine.assemble_page(block, PageTask(block.page, options, StageTimer())) for _ in range(batch)]
    running = engine.new_batch()
    timer = StageTimer(engine.device)
    with timer.stage("prefill"):
        running.join([page.sequence for page in pages])
    return timer.ms["prefill"], pages[0].prompt_tokens


def large_page_block(engine: OCREngine):
    """One Large page, encoded once: the vision encoder does not depend on retention."""
    image = document_page((1100, 800))
    with torch.inference_mode():
        return engine.prepare([PageTask(image, OcrOptions(mode="large", pruner="none"), StageTimer())])[0].block


def run_batch_axis(engine: OCREngine, batches: list[int], repeats: int) -> list[dict]:
    block = large_page_block(engine)
    records = []
    for b in batches:
        records += measure_batch(engine, block, b, repeats)
        print(f"  batch {b}: {repeats} rounds", flush=True)
    return records


@torch.inference_mode()
def measure_batch(engine: OCREngine, block, b: int, repeats: int) -> list[dict]:
    """Every retention at batch ``b``: one warm-up each, then ``repeats`` rounds in a rotated order;
    speedups are medians of per-round ratios to retention 1.0 (measured side by side)."""
    for r in RETENTIONS:  # warm-up
        prefill_ms(engine, block, b, r)
    samples: dict[float, list[float]] = {r: [] for r in RETENTIONS}
    prompts: dict[float, int] = {}
    for rep in range(repeats):
        for i in range(len(RETENTIONS)):
            r = RETENTIONS[(rep + i) % len(RETENTIONS)]
            ms, prompts[r] = prefill_ms(engine, block, b, r)
            samples[r].append(ms)
    records = []
    for r in RETENTIONS:
        speedup = statistics.median(x / y for x, y in zip(samples[1.0], samples[r], strict=True))
        ideal = prompts[1.0] / prompts[r]
        records.append(
            {
                "batch": b,
                "retention": r,
                "prompt_tokens": prompts[r],
                "prefill_ms": summarize(samples[r]),
                "ms_per_page": statistics.median(samples[r]) / b,
                "speedup": speedup,
                "ideal_speedup": ideal,
                "efficiency": speedup / ideal,
                "samples_ms": samples[r],
            }
        )
    return records


def print_batch_table(records: list[dict]) -> None:
    print(f"{'B':>3} {'ret':>7} {'prompt':>6} {'ms':>9} {'ms/page':>8} {'x':>6} {'ideal':>6} {'eff':>5}")
    for r in records:
        print(
            f"{r['batch']:>3} {r['retention']:>7} {r['prompt_tokens']:>6} {r['prefill_ms']['median']:>9.1f} "
            f"{r['ms_per_page']:>8.1f} {r['speedup']:>6.3f} {r['ideal_speedup']:>6.3f} {r['efficiency']:>5.2f}"
        )
