"""Adaptive retention off versus on, side by side, below, at and above capacity.

    python bench/adaptive.py --out bench/results/adaptive_tiny_cpu.json                  # tiny, CPU (~12 min)
    python bench/adaptive.py --model random-full --device cuda --out ...                    # full size, GPU

The mixed open-loop workload of ``bench/batching.py`` (Poisson arrivals, 70% short and 30% long pages,
n-gram guard off) goes to the real app under a fixed KV budget, where retention sets how many pages
decode together. Requests ask for retention 1.0 (unpruned), so what the policy serves is visible. First
the capacity is measured (pages/s with the policy off, arrivals far above it); then at 0.5x, 1x and 2x
that rate the two services — ``RTPRUNE_ADAPTIVE_TARGET_WAIT_S`` unset, and set with floor 0.5 — see
the same arrivals, back to back in alternating order, sharing one loaded engine. The capacity with every
page at the floor is measured too: its ratio to the first is the lever, the most pages/s the policy can
add, which bounds what it can do for latency and 503s above capacity. Printed: p50/p95
latency of answered requests, 503s, pages/s and the retentions served; raw numbers go to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.batching import add_workload_arguments, percentile, send_arrivals, workload
from bench.common import machine_label, write_json
from service.engine import OCREngine
from service.settings import ServiceSettings


async def open_loop(engine: OCREngine, settings: ServiceSettings, arrivals: list[tuple[float, int]], form: dict):
    """Send every arrival at its time; what was answered, refused and served."""
    sent, wall = await send_arrivals(engine, settings, arrivals, form)
    results: list[tuple[int, float, float | None]] = [  # (status, latency ms, served retention or None)
        (r.status_code, ms, r.json()["pages"][0]["stats"]["retention"] if r.status_code == 200 else None)
        for _, ms, r in sent
    ]
    answered = [ms for status, ms, _ in results if status == 200]
    served_retentions = [r for status, _, r in results if status == 200]
    return {
        "policy": "on" if settings.adaptive_target_wait_s else "off",
        "requests": len(results),
        "answered": len(answered),
        "refused_503": sum(1 for status, _, _ in results if status == 503),
        "other_failures": sum(1 for status, _, _ in results if status not in (200, 503)),
        "wall_s": wall,
        "pages_per_s": len(answered) / wall,
        "p50_ms": percentile(answered, 0.5),
        "p95_ms": percentile(answered, 0.95),
        "retentions": dict(sorted(Counter(round(r, 1) for r in served_retentions).items())),
        "min_retention": min(served_retentions, default=None),
        "latencies": [{"status": s, "ms": ms, "retention": r} for s, ms, r in results],
    }


def settings_for(engine: OCREngine, args, policy: bool) -> ServiceSettings:
    return ServiceSettings(
        model=engine.name,
        log_json=False,
        warmup=False,
        max_batch_size=args.batch_size,
        max_batch_tokens=args.budget_tokens,
        queue_size=args.queue_size,
        max_pdf_pages=min(args.queue_size, 50),  # a small queue: single pages only here
        request_timeout_s=args.timeout_s,
        adaptive_target_wait_s=args.target_wait_s if policy else None,
        adaptive_floor=args.floor,
    )


def row(run: dict, base: dict | None = None) -> str:
    line = (
        f"{run['policy']:>6} {run['answered']:>4}/{run['requests']:<4} {run['refused_503']:>5} "
        f"{run['pages_per_s']:>6.2f} {run['p50_ms']:>8.0f} {run['p95_ms']:>8.0f}  {run['retentions']}"
    )
    if base is not None:
        ratio = f"{run['refused_503'] / base['refused_503']:.2f}" if base["refused_503"] else "-"
        line += f" | p95 x{run['p95_ms'] / base['p95_ms']:.2f}, 503s x{ratio}, pages/s x"
        line += f"{run['pages_per_s'] / base['pages_per_s']:.2f}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser, mode="base", requests=100, batch_size=8)  # base: retention decides the batch
    parser.add_argument("--budget-tokens", type=int, default=1536, help="fixed KV budget")
    parser.add_argument("--queue-size", type=int, default=12, help="pages that may wait; more get 503")
    parser.add_argument("--timeout-s", type=float, default=120)
    parser.add_argument("--target-wait-s", type=float, default=2.0)
    parser.add_argument("--floor", type=float, default=0.5)
    parser.add_argument("--loads", default="0.5,1,2", help="arrival rates as multiples of the measured capacity")
    parser.add_argument("--out", default="bench/results/adaptive.json")
    args = parser.parse_args()
    engine = OCREngine.load(args.model, device=args.device, dtype=args.dtype)
    engine.warmup()
    form = {"mode": args.mode, "ngram_size": "0", "pruner": "rtprune", "retention": "1.0"}
    label = f"{machine_label(engine.device)}, model {args.model}, mode {args.mode}, {args.requests} requests per run"
    print(f"# {label}")
    flood = workload(100.0, args.requests, args.seed, args.short, args.long)  # arrivals far above capacity
    roomy = settings_for(engine, args, policy=False).model_copy(update={"queue_size": 4 * args.requests})
    capacity = asyncio.run(open_loop(engine, roomy, flood, form))["pages_per_s"]
    # the lever: every page at the floor, the most any policy can buy under this workload
    at_floor = asyncio.run(open_loop(engine, roomy, flood, {**form, "retention": str(args.floor)}))["pages_per_s"]
    print(f"capacity, policy off: {capacity:.2f} pages/s; every page at retention {args.floor:g}: {at_floor:.2f}")
    print(f"the lever (the most pages/s any policy with this floor can add): x{at_floor / capacity:.2f}\n")
    print(f"{'policy':>6} {'answered':>9} {'503s':>5} {'pages/s':>6} {'p50 ms':>8} {'p95 ms':>8}  retentions served")
    records = []
    for level, load in enumerate(float(x) for x in args.loads.split(",")):
        rate = load * capacity
        arrivals = workload(rate, args.requests, args.seed + 1 + level, args.short, args.long)
        order = [False, True] if level % 2 == 0 else [True, False]
        runs = {on: asyncio.run(open_loop(engine, settings_for(engine, args, on), arrivals, form)) for on in order}
        print(f"## {load:g}x capacity ({rate:.2f} arrivals/s)")
        for on in (False, True):
            runs[on].update(load=load, rate=rate)
            print(row(runs[on], runs[False] if on else None))
            records.append(runs[on])
    write_json(
        args.out,
        {
            "machine": label,
            "args": vars(args),
            "capacity_pages_per_s": capacity,
            "capacity_at_floor_pages_per_s": at_floor,
            "records": records,
        },
    )
    below_floor = [r for r in records if r["policy"] == "on" and (r["min_retention"] or 1) < args.floor - 0.01]
    if below_floor or any(r["other_failures"] for r in records):
        raise SystemExit("a page was served below the floor, or a request failed other than with 503")


if __name__ == "__main__":
    main()
