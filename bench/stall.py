"""Stall-free scheduling, measured as a reader sees it: the pause between tokens while a large page joins, and an
interactive page's latency while a long job runs. The join budget off and on, side by side in one run.

    python -m bench.stall --out bench/results/stall_tiny_cpu.json                      # tiny, CPU (~4 min)
    python -m bench.stall --in-process --model random-full --dtype float32 --out ...   # full size, CPU: the join
    python -m bench.stall --device cuda --model deepseek-ai/DeepSeek-OCR --out ...     # a GPU host

Each setting starts ``rtprune-ocr serve`` as a user would and measures two things over HTTP:

- **join**: ``--streams`` chat requests stream their tokens (``stream: true``, n-gram guard off, so they
  run to ``max_tokens``); once each has streamed a few, a Gundam page (a 1700 x 2200 document page) is
  POSTed to ``/v1/ocr``. Reported: the longest gap between two chunks of any stream while that page was
  being prepared and prefilled, beside the page's own vision + prefill time (its statistics), and the
  p99 gap over the whole run.
- **priority**: an interactive page's latency (``/v1/ocr``, one image) on the idle service, then while a
  ``--job-pages``-page job (``/v1/jobs``, a PDF) runs; the ratio is what the job costs the interactive
  reader.

Settings alternate in rounds (the machine is noisy). Raw numbers go to ``--out``. ``--in-process`` measures
the join alone, in this process, on the scheduler's own step times (``bench.decode_step.join_gap``): for the
full-size model on a CPU, where four HTTP streams of hundreds of tokens would take hours.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

from bench.common import write_json
from bench.pages import document_page
from tests.helpers import serve_process, text_pdf

SETTINGS = {"budget off": {"RTPRUNE_JOIN_BUDGET_MS": "0"}, "budget on": {}}


def png(size: tuple[int, int], seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    document_page(size, seed=seed).save(buffer, format="PNG")
    return buffer.getvalue()


def stream_chat(base: str, image: bytes, max_tokens: int, stamps: list[float], started: threading.Event) -> None:
    """One streaming chat request; the arrival time of each chunk goes to ``stamps``."""
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    body = {
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
        "max_tokens": max_tokens,
        "stream": True,
        "vllm_xargs": {"ngram_size": 0},
        "rtprune": {"mode": "tiny"},
    }
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=3600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                stamps.append(time.perf_counter())
                if len(stamps) >= 5:
                    started.set()


def join(base: str, streams: int, max_tokens: int) -> dict:
    """The longest gap between chunks of ``streams`` chat streams while a Gundam page joins them."""
    stamps: list[list[float]] = [[] for _ in range(streams)]
    started = [threading.Event() for _ in range(streams)]
    small = png((640, 640))
    threads = [
        threading.Thread(target=stream_chat, args=(base, small, max_tokens, stamps[i], started[i]))
        for i in range(streams)
    ]
    for thread in threads:
        thread.start()
    for event in started:
        event.wait(600)
    sent = time.perf_counter()
    answer = httpx.post(
        f"{base}/v1/ocr",
        files={"file": ("page.png", png((1700, 2200), seed=99), "image/png")},
        data={"mode": "gundam", "max_new_tokens": "2", "ngram_size": "0"},
        timeout=3600,
    )
    answered = time.perf_counter()
    answer.raise_for_status()
    for thread in threads:
        thread.join()
    latency = answer.json()["pages"][0]["stats"]["latency_ms"]
    gaps_during = [(b - a) * 1e3 for s in stamps for a, b in itertools.pairwise(s) if b >= sent and a <= answered]
    gaps = sorted((b - a) * 1e3 for s in stamps for a, b in itertools.pairwise(s))
    return {
        "longest_gap_while_joining_ms": max(gaps_during, default=0.0),
        "joiner_vision_plus_prefill_ms": latency["vision"] + latency["prefill"],
        "joiner_latency_ms": latency,
        "p99_gap_ms": gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))],
        "median_gap_ms": statistics.median(gaps),
        "chunks": sum(len(s) for s in stamps),
    }


def interactive_latency(base: str, image: bytes, mode: str) -> float:
    started = time.perf_counter()
    files = {"file": ("p.png", image, "image/png")}
    response = httpx.post(f"{base}/v1/ocr", files=files, data={"mode": mode}, timeout=3600)
    response.raise_for_status()
    return (time.perf_counter() - started) * 1e3


def priority(base: str, job_pages: int, samples: int, job_tokens: int) -> dict:
    """An interactive page's latency idle, then while a ``job_pages``-page job runs: a Gundam page (the default
    mode) and a Tiny one (where waiting behind job pages, not its own work, would dominate), alternating."""
    image = png((850, 1100), seed=3)
    modes = ("gundam", "tiny")
    for mode in modes:
        interactive_latency(base, image, mode)  # first request's lazy work, not counted
    idle = {mode: [interactive_latency(base, image, mode) for _ in range(samples)] for mode in modes}
    files = {"file": ("d.pdf", text_pdf(job_pages), "application/pdf")}
    data = {"max_new_tokens": str(job_tokens), "ngram_size": "0"}  # long enough to outlast the samples
    created = httpx.post(f"{base}/v1/jobs", files=files, data=data, timeout=60)
    created.raise_for_status()
    job = created.json()["id"]
    while httpx.get(f"{base}/v1/jobs/{job}", timeout=30).json()["pages_done"] < 1:
        time.sleep(0.05)
    busy: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(samples):
        for mode in modes:
            busy[mode].append(interactive_latency(base, image, mode))
    state = after = httpx.get(f"{base}/v1/jobs/{job}", timeout=30).json()
    if after["state"] != "running":
        raise SystemExit(f"the job ended before the samples did ({after['state']}): raise --job-tokens")
    while state["state"] not in ("done", "failed", "cancelled"):
        time.sleep(0.2)
        state = httpx.get(f"{base}/v1/jobs/{job}", timeout=30).json()
    return {
        "idle_ms": idle,
        "during_job_ms": busy,
        "ratio": {mode: statistics.median(busy[mode]) / statistics.median(idle[mode]) for mode in modes},
        "job_pages_done_after_samples": after["pages_done"],  # the job was still running then
        "job_state": state["state"],
    }


def in_process(args: argparse.Namespace) -> None:
    """The longest pause between decode steps while a Gundam page joins, budget off and on, in rounds."""
    from bench.decode_step import join_gap
    from service.engine import OCREngine

    engine = OCREngine.load(args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    records = []
    for round_ in range(args.rounds):
        names = list(SETTINGS) if round_ % 2 == 0 else list(SETTINGS)[::-1]
        for name in names:
            gap = join_gap(engine, args.running_pages, join_budget_ms=0.0 if name == "budget off" else None)
            latency = gap["gundam_latency_ms"]
            own = latency["vision"] + latency["prefill"]
            records.append({"setting": name, "round": round_, **gap, "joiner_vision_plus_prefill_ms": own})
            print(
                f"{name:>10} round {round_}: longest pause between steps while joining "
                f"{gap['largest_gap_while_joining_ms']:.0f} ms (joiner vision+prefill {own:.0f} ms, ratio "
                f"{gap['largest_gap_while_joining_ms'] / own:.2f}); steps before it "
                f"{gap['step_gap_before_ms']['median']:.0f} ms",
                flush=True,
            )
    if args.out:
        write_json(args.out, {"model": args.model, "device": args.device, "dtype": args.dtype, "records": records})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--job-pages", type=int, default=40)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/rtprune-ocr")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--in-process", action="store_true", help="only the join, in this process")
    parser.add_argument("--running-pages", type=int, default=2, help="with --in-process: pages decoding")
    args = parser.parse_args()
    if args.in_process:
        in_process(args)
        return
    flags = ["--model", args.model, "--device", args.device, *(["--dtype", args.dtype] if args.dtype else [])]
    env_common = {
        "RTPRUNE_RANDOM_MAX_NEW_TOKENS": str(max(args.max_tokens, 32)),
        "RTPRUNE_LOG_JSON": "false",
        "RTPRUNE_MAX_PDF_PAGES": str(max(100, args.job_pages)),  # a long job fits the upload and queue limits
        "RTPRUNE_QUEUE_SIZE": str(max(128, args.job_pages + 16)),
        "RTPRUNE_MAX_DOCUMENT_PIXELS": str(max(args.job_pages, 100) * 3_000_000),
    }
    records: list[dict] = []
    for round_ in range(args.rounds):
        names = list(SETTINGS) if round_ % 2 == 0 else list(SETTINGS)[::-1]
        for name in names:
            with serve_process(args.cache_dir, *flags, env={**env_common, **SETTINGS[name]}) as (base, _, _):
                info = httpx.get(f"{base}/v1/info", timeout=30).json()
                record = {
                    "setting": name,
                    "round": round_,
                    "scheduling": info.get("scheduling"),
                    "join": join(base, args.streams, args.max_tokens),
                    "priority": priority(base, args.job_pages, args.samples, args.max_tokens),
                }
            records.append(record)
            j, p = record["join"], record["priority"]
            print(
                f"{name:>10} round {round_}: longest gap while joining {j['longest_gap_while_joining_ms']:.0f} ms "
                f"(joiner vision+prefill {j['joiner_vision_plus_prefill_ms']:.0f} ms, ratio "
                f"{j['longest_gap_while_joining_ms'] / j['joiner_vision_plus_prefill_ms']:.2f}); p99 gap "
                f"{j['p99_gap_ms']:.0f} ms; interactive page during a {args.job_pages}-page job "
                f"{p['ratio']['gundam']:.2f}x its idle latency (a Tiny page {p['ratio']['tiny']:.2f}x)",
                flush=True,
            )
    if args.out:
        write_json(args.out, {"model": args.model, "device": args.device, "records": records})
        print(json.dumps({"written": str(args.out)}))


if __name__ == "__main__":
    main()
