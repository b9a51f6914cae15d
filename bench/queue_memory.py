"""The service's memory while a queue of large images waits: 16 RGBA PNGs of 39.9 megapixels (a few hundred
KB each, 160 MB each once decoded) posted at once to `rtprune-ocr serve --model tiny`.

    python bench/queue_memory.py --out bench/results/queue_memory.json

Waiting pages hold their encoded bytes only; the preprocessing threads and the running batch decode a few
at a time. The server's resident memory is sampled every 50 ms (VmRSS) and its peak read at the end
(VmHWM).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import run_together, write_json
from service.loadtest import free_port, wait_ready


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return 0.0


def big_png() -> bytes:
    image = Image.new("RGBA", (7300, 5466), (250, 250, 245, 255))  # 39.9 MP
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def main() -> None:
    import subprocess

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench/out/queue_memory.json"))
    args = parser.parse_args()
    port = free_port()
    command = [sys.executable, "-m", "service.cli", "--log-level", "WARNING", "serve", "--model", "tiny"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--no-warmup"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, server, timeout=180)
        png = big_png()
        idle = rss_mb(server.pid)
        samples: list[float] = []
        statuses: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(rss_mb(server.pid))
                time.sleep(0.05)

        def post() -> None:
            files = {"file": ("page.png", png, "image/png")}
            data = {"mode": "tiny", "max_new_tokens": "2"}
            statuses.append(httpx.post(f"{base}/v1/ocr", files=files, data=data, timeout=600).status_code)

        sampler = threading.Thread(target=sample)
        sampler.start()
        seconds = run_together(post, args.images)
        done.set()
        sampler.join()
        peak = rss_mb(server.pid, "VmHWM")
        result = {
            "images": args.images,
            "png_bytes_each": len(png),
            "decoded_mb_each": 7300 * 5466 * 4 / 2**20,
            "statuses": sorted(statuses),
            "seconds": seconds,
            "rss_idle_mb": idle,
            "rss_max_sampled_mb": max(samples),
            "rss_peak_mb": peak,
        }
        print(result)
        write_json(args.out, result)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
