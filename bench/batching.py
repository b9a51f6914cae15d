"""Static versus continuous batching under an open-loop mixed workload, side by side in one run.

    python bench/batching.py --out bench/results/batching_tiny_cpu.json             # tiny, CPU
    python bench/batching.py --model random-full --device cuda --rates 2,4,8 --out ...  # full size, GPU

Requests arrive as a Poisson process (seeded: both services see the same arrival times
and the same pages): 70% short pages (16 new tokens) and 30% long pages (256), n-gram
guard off so lengths are exact. They go to the real app (httpx over ASGI: form parsing,
the page queue and the scheduler included). At each rate the two services,
``RTPRUNE_BATCHING=static`` and ``continuous``, run back to back in alternating order and
share one loaded engine. Then, with a fixed KV budget, continuous batching at retention
1.0 versus 0.5 shows the gain pruning buys under batching.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_label, write_json
from bench.pages import document_page
from service.api.app import create_app
from service.engine import OCREngine
from service.settings import ServiceSettings


def page_png() -> bytes:
    buffer = io.BytesIO()
    document_page((850, 1100)).save(buffer, format="PNG")
    return buffer.getvalue()


def workload(rate: float, n: int, seed: int, short: int, long: int) -> list[tuple[float, int]]:
    """(arrival time in s, new tokens) per request: Poisson arrivals, 70% short and 30% long pages."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append((t, long if rng.random() < 0.3 else short))
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


@asynccontextmanager
async def served(
    engine: OCREngine, settings: ServiceSettings, timeout_s: float = 1200
) -> AsyncIterator[httpx.AsyncClient]:
    """The service on ``engine``, in this process (lifespan, scheduler and all), and a client for it
    once it is ready: the served path without a network hop."""
    app = create_app(settings, load_engine=lambda: engine)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=timeout_s) as client:
            while (await client.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.02)
            yield client


async def send_arrivals(
    engine: OCREngine, settings: ServiceSettings, arrivals: list[tuple[float, int]], form: dict
) -> tuple[list[tuple[int, float, httpx.Response]], float]:
    """POST one page per arrival at its time to the service on ``engine``: (new tokens, latency ms, response)
    per request, in the order they ended, and the run's wall time in seconds."""
    png = page_png()
    results: list[tuple[int, float, httpx.Response]] = []
    async with served(engine, settings) as client:
        start = time.perf_counter()

        async def one(at: float, tokens: int) -> None:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
            sent = time.perf_counter()
            data = {**form, "max_new_tokens": str(tokens)}
            response = await client.post("/v1/ocr", files={"file": ("p.png", png)}, data=data)
            results.append((tokens, (time.perf_counter() - sent) * 1e3, response))

        await asyncio.gather(*[one(at, tokens) for at, tokens in arrivals])
        return results, time.perf_counter() - start


async def open_loop(engine: OCREngine, settings: ServiceSettings, arrivals: list[tuple[float, int]], form: dict):
    sent, wall = await send_arrivals(engine, settings, arrivals, form)
    results = [(tokens, ms, response.status_code) for tokens, ms, response in sent]  # (new tokens, ms, status)
    ok = [r for r in results if r[2] == 200]
    short_tokens = min(t for _, t in arrivals)
    short = [ms for tokens, ms, _ in ok if tokens == short_tokens]
    long = [ms for tokens, ms, _ in ok if tokens != short_tokens]
    return {
        "batching": settings.batching,
        "retention": form["retention"],
        "max_batch_tokens": settings.max_batch_tokens,
        "requests": len(results),
        "failures": len(results) - len(ok),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "tokens_per_s": sum(tokens for tokens, _, _ in ok) / wall,
        "short_p50_ms": percentile(short, 0.5),
        "short_p95_ms": percentile(short, 0.95),
        "long_p50_ms": percentile(long, 0.5),
        "long_p95_ms": percentile(long, 0.95),
        "latencies": [{"new_tokens": t, "ms": ms, "status": s} for t, ms, s in results],
    }


def add_workload_arguments(parser: argparse.ArgumentParser, *, mode: str, requests: int, batch_size: int) -> None:
    """The model and mixed-workload flags the open-loop benchmarks share (this one and ``adaptive.py``)."""
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--mode", default=mode)
    parser.add_argument("--requests", type=int, default=requests, help="requests per run")
    parser.add_argument("--short", type=int, default=16, help="new tokens of a short page (70%%)")
    parser.add_argument("--long", type=int, default=256, help="new tokens of a long page (30%%)")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--seed", type=int, default=0)


def service_settings(
    engine: OCREngine, batching: str, args, max_batch_tokens: int | None = None, join_budget_ms: float | None = None
) -> ServiceSettings:
    return ServiceSettings(
        join_budget_ms=join_budget_ms,
        model=engine.name,
        log_json=False,
        warmup=False,
        batching=batching,
        max_batch_size=args.batch_size,
        max_batch_tokens=max_batch_tokens,
        queue_size=1024,
        request_timeout_s=3600,
    )


def row(run: dict, base: dict | None = None) -> str:
    line = (
        f"{run['batching']:>10} {run['retention']:>5} {run['requests_per_s']:>6.2f} {run['tokens_per_s']:>7.1f} "
        f"{run['short_p50_ms']:>8.0f} {run['short_p95_ms']:>8.0f} {run['long_p50_ms']:>8.0f} {run['long_p95_ms']:>8.0f}"
    )
    if base is not None:
        line += f" | x{run['requests_per_s'] / base['requests_per_s']:.2f} req/s"
        line += f", short p95 x{run['short_p95_ms'] / base['short_p95_ms']:.2f}"
    return line


def join_budget_runs(engine: OCREngine, args, form: dict, rate: float, header: str) -> list[dict]:
    """Continuous batching with stall-free joining off and on (measured budget), alternating over rounds on the
    same arrivals: what bounding the pause between tokens costs in throughput."""
    arrivals = workload(rate, args.requests, args.seed + 200, args.short, args.long)
    print(f"\n## rate {rate:g}/s, join budget off vs on, {args.join_budget_rounds} rounds\n{header}")
    runs: list[dict] = []
    for round_ in range(args.join_budget_rounds):
        order = [0.0, None] if round_ % 2 == 0 else [None, 0.0]
        for budget in order:
            settings = service_settings(engine, "continuous", args, join_budget_ms=budget)
            run = asyncio.run(open_loop(engine, settings, arrivals, form))
            run.update(rate=rate, join_budget="off" if budget == 0.0 else "measured", round=round_)
            print(f"{run['join_budget']:>8}: " + row(run))
            runs.append(run)
    off, on = ([r["requests_per_s"] for r in runs if r["join_budget"] == name] for name in ("off", "measured"))
    print(f"join budget on / off: x{statistics.median(on) / statistics.median(off):.2f} req/s (medians)")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser, mode="tiny", requests=30, batch_size=32)
    parser.add_argument("--rates", default="1,2,4", help="arrivals per second")
    parser.add_argument("--budget-tokens", type=int, default=1536, help="fixed KV budget for the retention runs")
    parser.add_argument("--budget-mode", default="base", help="mode of the retention runs (more visual tokens)")
    parser.add_argument("--join-budget-rounds", type=int, default=3, help="rounds of join budget off vs on")
    parser.add_argument("--only-join-budget", action="store_true", help="only the join budget comparison")
    parser.add_argument("--out", default="bench/results/batching.json")
    args = parser.parse_args()
    engine = OCREngine.load(args.model, device=args.device, dtype=args.dtype)
    engine.warmup()
    form = {"mode": args.mode, "ngram_size": "0", "pruner": "rtprune", "retention": "0.8425"}
    label = f"{machine_label(engine.device)}, model {args.model}, mode {args.mode}, {args.requests} requests per run"
    print(f"# {label}")
    header = f"{'batching':>10} {'ret':>5} {'req/s':>6} {'tok/s':>7} "
    header += f"{'short50':>8} {'short95':>8} {'long50':>8} {'long95':>8}"
    records = []
    top = max(float(r) for r in args.rates.split(","))
    join_budget = join_budget_runs(engine, args, form, top, header)
    if args.only_join_budget:
        write_json(args.out, {"machine": label, "args": vars(args), "join_budget_records": join_budget})
        return
    for level, rate in enumerate(float(r) for r in args.rates.split(",")):
        arrivals = workload(rate, args.requests, args.seed + level, args.short, args.long)
        order = ["static", "continuous"] if level % 2 == 0 else ["continuous", "static"]
        runs = {b: asyncio.run(open_loop(engine, service_settings(engine, b, args), arrivals, form)) for b in order}
        print(f"\n## rate {rate:g}/s\n{header}")
        for batching in ("static", "continuous"):
            runs[batching]["rate"] = rate
            print(row(runs[batching], runs["static"] if batching == "continuous" else None))
            records.append(runs[batching])
    arrivals = workload(top, args.requests, args.seed + 100, args.short, args.long)
    print(f"\n## rate {top:g}/s, mode {args.budget_mode}, KV budget {args.budget_tokens} tokens\n{header}")
    budget_runs = []
    for retention in ("1.0", "0.5"):
        budget_form = {**form, "mode": args.budget_mode, "retention": retention}
        settings = service_settings(engine, "continuous", args, args.budget_tokens)
        run = asyncio.run(open_loop(engine, settings, arrivals, budget_form))
        run["rate"] = top
        print(row(run, budget_runs[0] if budget_runs else None))
        budget_runs.append(run)
    payload = {"records": records, "budget_records": budget_runs, "join_budget_records": join_budget}
    write_json(args.out, {"machine": label, "args": vars(args), **payload})
    if any(r["failures"] for r in [*records, *budget_runs]):
        raise SystemExit("some requests failed")


if __name__ == "__main__":
    main()
