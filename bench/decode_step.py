"""Milliseconds per decode step against rows and context, the slot cache against the padded one, side by side.

    python bench/decode_step.py --out bench/results/decode_step_cpu_fp32.json             # random-full, fp32
    python bench/decode_step.py --device cuda --dtype bf16 --out bench/results/decode_step_cuda.json

The running batch's cache is filled with random K/V of the wanted shape (a step's cost does not depend
on the values, and prefilling 8 x 4,096 tokens would take the CPU most of an hour), then both layouts
take the same steps in alternating rounds: ``slots`` (each step writes one column per row in place) and
``padded`` (the earlier ``DynamicCache``, which concatenates every layer's whole cache at every step).
Shapes whose cache would not fit the memory left beside the weights are skipped.

``--join-gap`` also measures, through the scheduler, the longest pause between two decode steps of
running pages while a Gundam page joins them (its vision encoder, pruning and prefill run between two
steps on the model's thread; its rendering and preprocessing no longer do).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_label, summarize, write_json
from bench.pages import document_page
from service.engine import OCREngine, OcrOptions
from service.engine.decode.batch import RunningBatch
from service.engine.decode.slots import SlotCache
from service.scheduler.capacity import step_times_ms, synthetic_sequences

ROWS = (1, 4, 8, 16)
WIDTHS = (512, 2048, 4096)


def filled_batch(engine: OCREngine, layout: str, rows: int, width: int) -> RunningBatch:
    """A running batch of ``rows`` rows whose caches hold ``width`` random tokens each (either layout)."""
    from transformers import DynamicCache

    config, model = engine.model.text_config, engine.model
    heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    shape = (rows, heads, width, head_dim)
    sequences = synthetic_sequences(engine, rows, width, budget=10**6)
    for sequence in sequences:
        sequence.tokens.append(0)  # the prefill's token: the cache holds the prompt, the step feeds this one
    batch = RunningBatch(model, cache=layout)
    if layout == "slots":
        cache = SlotCache(config.num_hidden_layers)
        like = DynamicCache(config=config)
        for index in range(config.num_hidden_layers):
            probe = torch.zeros(1, heads, 1, head_dim, device=engine.device, dtype=model.dtype)
            like.update(probe, probe, index)
        cache.allocate(like, rows, width)
        for layer in cache.layers:
            layer.keys[:rows, :, :width].normal_()
            layer.values[:rows, :, :width].normal_()
        cache.lengths = [width] * rows
    else:
        cache = DynamicCache(config=config)
        for index in range(config.num_hidden_layers):
            states = torch.randn(shape, device=engine.device, dtype=model.dtype)
            cache.update(states, torch.randn_like(states), index)
    batch._cache, batch.rows, batch._slots = cache, list(sequences), list(sequences)
    batch._last = torch.zeros(rows, dtype=torch.long, device=engine.device)
    return batch


def fits(engine: OCREngine, rows: int, width: int, cache_budget_gb: float) -> bool:
    return rows * width * engine.model.kv_bytes_per_token() * 1.25 <= cache_budget_gb * 2**30


def measure(engine: OCREngine, args) -> list[dict]:
    records = []
    for width in WIDTHS:
        for rows in ROWS:
            if not fits(engine, rows, width, args.cache_gb):
                print(f"{rows:>4} {width:>6}  skipped: the cache would not fit beside the weights", flush=True)
                records.append({"rows": rows, "width": width, "skipped": "does not fit"})
                continue
            samples: dict[str, list[float]] = {"slots": [], "padded": []}
            for round_ in range(args.rounds):  # alternate, so machine noise hits both alike
                for layout in ("slots", "padded") if round_ % 2 == 0 else ("padded", "slots"):
                    batch = filled_batch(engine, layout, rows, width)
                    samples[layout] += step_times_ms(engine, batch, args.steps)
                    del batch
                    gc.collect()
            slots, padded = (summarize(samples[k])["median"] for k in ("slots", "padded"))
            print(f"{rows:>4} {width:>6} {slots:>10.1f} {padded:>10.1f} {padded / slots:>7.2f}x", flush=True)
            records.append(
                {
                    "rows": rows,
                    "width": width,
                    "slots_ms": summarize(samples["slots"]),
                    "padded_ms": summarize(samples["padded"]),
                    "speedup": padded / slots,
                    "samples_ms": samples,
                }
            )
    return records


def join_gap(engine: OCREngine, running_pages: int, join_budget_ms: float | None = 0.0) -> dict:
    """The longest pause between decode steps while a Gundam page joins ``running_pages`` decoding pages (with the
    join budget off by default: the page's whole vision and prefill between two steps)."""
    from service.inputs import Document
    from service.scheduler import PageRequest, Scheduler, SchedulerConfig

    stamps: list[float] = []
    config = SchedulerConfig(warmup=False, max_batch_size=running_pages + 1, join_budget_ms=join_budget_ms)
    scheduler = Scheduler(lambda: engine, config, on_step=lambda rows: stamps.append(time.perf_counter()))
    scheduler.start()
    while scheduler.state == "loading":
        time.sleep(0.05)
    deadline = time.monotonic() + 3600
    decoding = [
        PageRequest(
            Document([1], _images=[document_page((640, 640), seed=i)]),
            OcrOptions(mode="tiny", max_new_tokens=8192, ngram_size=0),
            deadline,
        )
        for i in range(running_pages)
    ]
    for request in decoding:
        scheduler.submit(request)
    while len(stamps) < 5:
        time.sleep(0.01)
    joined_at = time.perf_counter()
    gundam = PageRequest(
        Document([1], _images=[document_page((1700, 2200), seed=99)]),
        OcrOptions(mode="gundam", max_new_tokens=2, ngram_size=0),
        deadline,
    )
    scheduler.submit(gundam)
    gundam.future.result(timeout=3600)
    for _ in range(3):  # a few steps after it joined
        count = len(stamps)
        while len(stamps) == count:
            time.sleep(0.01)
    scheduler.stop()
    before = [b - a for a, b in itertools.pairwise(stamps) if b < joined_at]
    during = [b - a for a, b in itertools.pairwise(stamps) if b >= joined_at]
    return {
        "running_pages": running_pages,
        "step_gap_before_ms": summarize([g * 1e3 for g in before]),
        "largest_gap_while_joining_ms": max(during) * 1e3,
        "gundam_latency_ms": gundam.future.result()[0].stats.latency_ms.model_dump(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random-full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["bf16", "fp32"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round and layout")
    parser.add_argument("--cache-gb", type=float, default=5.5, help="largest cache measured (beside the weights)")
    parser.add_argument("--join-gap", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/out/decode_step.json"))
    args = parser.parse_args()
    engine = OCREngine.load(args.model, device=args.device, dtype=args.dtype)
    print(f"# decode step, {engine.name} on {machine_label(engine.device)}, {args.dtype}")
    print(f"{'rows':>4} {'width':>6} {'slots ms':>10} {'padded ms':>10} {'padded/slots':>8}")
    with torch.inference_mode():
        records = measure(engine, args)
    payload = {"device": machine_label(engine.device), "model": engine.name, "dtype": args.dtype, "steps": records}
    if args.join_gap:
        payload["join_gap"] = join_gap(engine, running_pages=8)
        print(f"# join gap: {payload['join_gap']}")
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
