"""How long one hostile request freezes everyone else: the longest gap between answers of a `/healthz`
probe (every 20 ms from another client) while each case of hostile input round three is sent to
`rtprune-ocr serve --model tiny`, and the server's memory growth against the body's size.

    python bench/hostile_stalls.py --out bench/results/hostile_stalls_cpu.json

Each case runs after an idle window measured the same way, so the two gaps read side by side on the
same (noisy) machine. Targets of issue #39: a stall of at most 0.5 s per case and memory growth of at
most 3x the body. Timed here, never in a test.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_json
from bench.queue_memory import rss_mb
from service.loadtest import free_port, wait_ready
from tests.helpers import data_url, text_pdf

PROBE_EVERY_S = 0.02


class Probe:
    """`/healthz` from its own connection, every PROBE_EVERY_S: the times between answers, and the server's
    resident memory at each."""

    def __init__(self, base: str, pid: int) -> None:
        self.base, self.pid, self.gaps, self.rss = base, pid, [0.0], [rss_mb(pid)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as client:
            last = time.monotonic()
            while not self._stop.is_set():
                client.get("/healthz")
                now = time.monotonic()
                self.gaps.append(now - last)
                self.rss.append(rss_mb(self.pid))
                last = now
                time.sleep(PROBE_EVERY_S)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def png_data_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buffer, format="PNG")
    return data_url(buffer.getvalue(), "image/png")


def cases() -> dict[str, Callable[[httpx.Client], tuple[int, int]]]:
    """Name -> a sender returning (status, body bytes)."""
    pdf = data_url(text_pdf(2, lines=2), "application/pdf")
    image = png_data_url()

    def post(path: str, body: bytes) -> Callable[[httpx.Client], tuple[int, int]]:
        def send(client: httpx.Client) -> tuple[int, int]:
            response = client.post(path, content=body, headers={"content-type": "application/json"})
            return response.status_code, len(body)

        return send

    chat_parts = [{"type": "text", "text": "x" * 64} for _ in range(250_000)]
    chat_parts.append({"type": "image_url", "image_url": {"url": image}})
    return {
        "mistral pages string, 16 KB of 0-99999 ranges": post(
            "/v1/ocr",
            json.dumps(
                {"document": {"type": "document_url", "document_url": pdf}, "pages": ",".join(["0-99999"] * 2000)}
            ).encode(),
        ),
        "chat with 50 MB of tools": post(
            "/v1/chat/completions",
            json.dumps(
                {
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}],
                    "tools": [{"a": 1}] * 6_000_000,
                }
            ).encode(),
        ),
        "chat with 20 MB of text parts": post(
            "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": chat_parts}]}).encode()
        ),
        "mistral with a 30 MB data URL": post(
            "/v1/ocr",
            json.dumps(
                {"document": {"type": "image_url", "image_url": "data:image/png;base64," + "A" * 30_000_000}}
            ).encode(),
        ),
        "mistral pages [0, 999] of a long PDF": post(
            "/v1/ocr",
            json.dumps(
                {
                    "document": {
                        "type": "document_url",
                        "document_url": data_url(text_pdf(1000, lines=1), "application/pdf"),
                    },
                    "pages": [0, 999],
                    "rtprune": {"mode": "tiny"},
                    "max_new_tokens": 2,
                }
            ).encode(),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/out/hostile_stalls.json"))
    parser.add_argument("--only", default="", help="run the cases whose name holds this text")
    args = parser.parse_args()
    port = free_port()
    command = [sys.executable, "-m", "service.cli", "--log-level", "WARNING", "serve", "--model", "tiny"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--no-warmup", "--max-pdf-pages", "100"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_ready(base, server, timeout=180)
        senders = {name: send for name, send in cases().items() if args.only in name}
        with httpx.Client(base_url=base, timeout=300) as client:
            for name, send in senders.items():
                with Probe(base, server.pid) as idle:
                    time.sleep(1.0)
                before = rss_mb(server.pid)
                with Probe(base, server.pid) as during:
                    status, size = send(client)
                grown = max(during.rss) - before
                row = {
                    "case": name,
                    "status": status,
                    "body_mb": size / 1e6,
                    "idle_max_gap_s": max(idle.gaps),
                    "max_gap_s": max(during.gaps),
                    "stall_over_idle": max(during.gaps) / max(idle.gaps),
                    "rss_peak_growth_mb": grown,
                    "growth_over_body": grown / (size / 1e6),
                }
                rows.append(row)
                print(
                    f"{name:<48} {status}  body {row['body_mb']:7.2f} MB  /healthz max gap {row['max_gap_s']:.3f} s "
                    f"(idle {row['idle_max_gap_s']:.3f} s, {row['stall_over_idle']:.1f}x)  "
                    f"peak RSS +{grown:.0f} MB ({row['growth_over_body']:.1f}x the body)"
                )
    finally:
        server.terminate()
        server.wait(60)
    write_json(args.out, {"cases": rows, "probe_every_s": PROBE_EVERY_S, "machine": f"{os.cpu_count()} cores"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
