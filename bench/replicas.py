"""One process versus Ray Serve with 1 and 2 replicas, under the same closed-loop HTTP load.

Every service is started as a user starts it (``rtprune-ocr serve [--replicas N]``, the tiny preset,
CPU), one after the other, in rounds with the order rotated (the machine is noisy); each is measured
the same way:
- concurrency 1: ``--single`` sequential requests, median latency (Ray's overhead per request is the
  difference to the plain service);
- load: ``--users`` clients that each send the next request as soon as the last one answered, for
  ``--seconds``; completed requests per second and latency percentiles.

    python -m bench.replicas --out bench/results/replicas_tiny_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.batching import page_png, percentile
from bench.common import run_together, write_json
from service.loadtest import free_port, wait_ready

SETUPS = {  # name -> extra serve flags; every setup gets the machine's CPUs in all
    "plain": [],
    "ray-1": ["--replicas", "1"],
    "ray-2": ["--replicas", "2"],
}


def start(flags: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "service.cli", "serve", "--model", "tiny", "--device", "cpu"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--replica-metrics-port", str(free_port()), *flags]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, process, timeout=180)
    return process, base


def request(client: httpx.Client, base: str, page: bytes, tokens: int) -> float:
    started = time.perf_counter()
    response = client.post(
        f"{base}/v1/ocr",
        files={"file": ("page.png", page)},
        data={"mode": "tiny", "max_new_tokens": str(tokens), "ngram_size": "0"},
        timeout=300,
    )
    response.raise_for_status()
    return time.perf_counter() - started


def measure(base: str, args: argparse.Namespace, page: bytes) -> dict:
    with httpx.Client() as client:
        for _ in range(3):  # warm connections and caches
            request(client, base, page, args.tokens)
        single = [request(client, base, page, args.tokens) for _ in range(args.single)]
    latencies: list[float] = []
    stop_at = time.monotonic() + args.seconds
    lock = threading.Lock()

    def user() -> None:
        with httpx.Client() as client:
            while time.monotonic() < stop_at:
                elapsed = request(client, base, page, args.tokens)
                with lock:
                    latencies.append(elapsed)

    wall = run_together(user, args.users)
    return {
        "single_median_ms": statistics.median(single) * 1e3,
        "single_ms": [round(s * 1e3, 2) for s in single],
        "load_requests": len(latencies),
        "load_wall_s": wall,
        "load_requests_per_s": len(latencies) / wall,
        "load_p50_s": percentile(latencies, 0.5),
        "load_p95_s": percentile(latencies, 0.95),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--single", type=int, default=20, help="sequential requests at concurrency 1")
    parser.add_argument("--users", type=int, default=8, help="closed-loop clients under load")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=32, help="max_new_tokens of every request")
    parser.add_argument("--out", type=Path, default=Path("bench/results/replicas_tiny_cpu.json"))
    args = parser.parse_args()
    page = page_png()
    runs: list[dict] = []
    logs = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    names = list(SETUPS)
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            process, base = start(SETUPS[name], logs / f"{name}-{round_index}.log")
            try:
                result = measure(base, args, page)
            finally:
                process.terminate()
                process.wait(timeout=60)
            runs.append({"setup": name, "round": round_index, **result})
            print(
                f"round {round_index} {name:6s} c=1 {result['single_median_ms']:7.1f} ms   "
                f"load {result['load_requests_per_s']:5.2f} req/s  p95 {result['load_p95_s']:5.2f} s"
            )
    summary = {}
    for name in names:
        mine = [r for r in runs if r["setup"] == name]
        summary[name] = {
            "single_median_ms": statistics.median(r["single_median_ms"] for r in mine),
            "load_requests_per_s": statistics.median(r["load_requests_per_s"] for r in mine),
            "load_p95_s": statistics.median(r["load_p95_s"] for r in mine),
        }
    plain, one, two = summary["plain"], summary["ray-1"], summary["ray-2"]
    ratios = {
        "ray_overhead_ms_per_request_c1": one["single_median_ms"] - plain["single_median_ms"],
        "ray1_vs_plain_throughput": one["load_requests_per_s"] / plain["load_requests_per_s"],
        "ray2_vs_ray1_throughput": two["load_requests_per_s"] / one["load_requests_per_s"],
        "ray2_vs_plain_throughput": two["load_requests_per_s"] / plain["load_requests_per_s"],
    }
    print("\nmedians over rounds:")
    for name, values in summary.items():
        print(f"  {name:6s} {values}")
    print("ratios (side by side, this run):", {k: round(v, 3) for k, v in ratios.items()})
    write_json(
        args.out,
        {
            "what": "plain service vs Ray Serve 1 and 2 replicas, tiny preset, CPU, closed-loop HTTP load",
            "cpus": len(os.sched_getaffinity(0)),
            "args": {k: str(v) for k, v in vars(args).items()},
            "runs": runs,
            "summary": summary,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
