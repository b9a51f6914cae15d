"""Throughput and latency with micro-batching on versus off, side by side in one run.

    python bench/batching.py --out bench/results/batching_tiny_cpu.json            # tiny, CPU
    python bench/batching.py --model random-full --device cuda --out ...            # full size, GPU

Closed-loop clients (concurrency 1, 4, 8, 16) post a page to the real app (httpx over
ASGI, so form parsing, queueing and the worker are all included) as soon as their previous
answer arrives. At each concurrency the two services, batching off (max batch 1) and on,
run back to back in alternating order; both share one loaded engine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
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


async def closed_loop(
    engine: OCREngine, batch: int, concurrency: int, requests: int, form: dict, wait_ms: float
) -> dict:
    settings = ServiceSettings(
        model=engine.name,
        log_json=False,
        max_batch_size=batch,
        batch_wait_ms=wait_ms,
        queue_size=max(16, 2 * concurrency),
        warmup=False,
    )
    app = create_app(settings, load_engine=lambda: engine)
    png = page_png()
    latencies: list[float] = []
    failures = 0
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:
            while (await client.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.02)
            remaining = [requests]

            async def client_loop() -> None:
                nonlocal failures
                while remaining[0] > 0:
                    remaining[0] -= 1
                    start = time.perf_counter()
                    response = await client.post("/v1/ocr", files={"file": ("p.png", png)}, data=form)
                    latencies.append((time.perf_counter() - start) * 1e3)
                    failures += response.status_code != 200

            start = time.perf_counter()
            await asyncio.gather(*[client_loop() for _ in range(concurrency)])
            wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "batch": batch,
        "concurrency": concurrency,
        "requests": len(latencies),
        "failures": failures,
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "p50_ms": statistics.median(ordered),
        "p95_ms": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "latencies_ms": latencies,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--mode", default="tiny")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=ServiceSettings().batch_wait_ms)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--out", default="bench/results/batching.json")
    args = parser.parse_args()
    engine = OCREngine.load(args.model, device=args.device, dtype=args.dtype)
    engine.warmup()
    form = {"mode": args.mode, "max_new_tokens": str(args.max_new_tokens), "ngram_size": "0", "retention": "auto"}
    label = (
        f"{machine_label(engine.device)}, model {args.model}, mode {args.mode}, {args.max_new_tokens} new tokens, "
        f"batch window {args.batch_wait_ms:g} ms"
    )
    print(f"# {label}")
    print(f"{'conc':>4} {'batch':>5} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} | {'x req/s':>7} {'x p50':>6}")
    records = []
    for level, concurrency in enumerate(int(c) for c in args.concurrency.split(",")):
        requests = max(4, concurrency * args.requests_per_client)
        order = [1, args.batch_size] if level % 2 == 0 else [args.batch_size, 1]
        runs = {b: asyncio.run(closed_loop(engine, b, concurrency, requests, form, args.batch_wait_ms)) for b in order}
        off, on = runs[1], runs[args.batch_size]
        on["speedup_requests_per_s"] = on["requests_per_s"] / off["requests_per_s"]
        on["p50_ratio"] = on["p50_ms"] / off["p50_ms"]
        for run in (off, on):
            print(
                f"{concurrency:>4} {run['batch']:>5} {run['requests_per_s']:>7.2f} {run['p50_ms']:>8.0f} "
                f"{run['p95_ms']:>8.0f} | "
                + (f"{on['speedup_requests_per_s']:>7.2f} {on['p50_ratio']:>6.2f}" if run is on else "")
            )
            records.append(run)
    write_json(args.out, {"machine": label, "batch_size": args.batch_size, "records": records})
    if any(r["failures"] for r in records):
        raise SystemExit("some requests failed")


if __name__ == "__main__":
    main()
