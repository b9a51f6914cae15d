"""`rtprune-ocr loadtest`: run the locust load test headless and summarise it in one line.

Without ``--host`` it first starts ``rtprune-ocr serve --model tiny`` on a free loopback port
(random weights: this tests the service, not OCR quality) and stops it afterwards.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

LOCUSTFILE = Path(__file__).resolve().parents[1] / "docker" / "locustfile.py"


def free_port() -> int:
    """A loopback TCP port nobody listens on now (for a server started next)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(
    base: str, process: subprocess.Popen | None = None, timeout: float = 120.0, path: str = "/readyz"
) -> None:
    """Poll ``base`` + ``path`` until it answers 200; fail early if ``process`` (the server) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
        try:
            if httpx.get(f"{base}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{base} did not become ready within {timeout:.0f} s")


def summarize(stats_csv: Path) -> dict[str, float]:
    """Locust's own final statistics: the aggregated row (every HTTP request; the server's reported values
    are kept out of it) and the back-pressure row."""
    with stats_csv.open() as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    total = rows.get("Aggregated", {})
    return {
        "requests": int(total.get("Request Count", 0) or 0),
        "failures": int(total.get("Failure Count", 0) or 0),
        "backpressure": int(rows.get("POST /v1/ocr [503 back-pressure]", {}).get("Request Count", 0) or 0),
        "median_ms": float(total.get("Median Response Time", 0) or 0),
        "p95_ms": float(total.get("95%", 0) or 0),
        "requests_per_s": float(total.get("Requests/s", 0) or 0),
    }


def run_loadtest(
    users: int,
    duration_s: int,
    out: Path,
    host: str | None = None,
    model: str = "tiny",
    locustfile: Path = LOCUSTFILE,
) -> int:
    """Run the load test; return 0 only when every request succeeded."""
    if not locustfile.exists():
        print(
            f"error: {locustfile} not found; run from a checkout of the repository, or pass --locustfile "
            "(the image has it at /opt/rtprune-ocr/locustfile.py)",
            file=sys.stderr,
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    server = None
    if host is None:
        port = free_port()
        host = f"http://127.0.0.1:{port}"
        log = (out / "server.log").open("w")
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--model",
                model,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--queue-size",
                str(max(128, 4 * users)),  # at least the largest document (max_pdf_pages), and room for every user
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RTPRUNE_DEVICE": "cpu"} if model == "tiny" else dict(os.environ),
        )
    try:
        wait_ready(host, server, timeout=300)
        command = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(locustfile),
            "--headless",
            "--users",
            str(users),
            "--spawn-rate",
            str(users),
            "--run-time",
            f"{duration_s}s",
            "--host",
            host,
            "--csv",
            str(out / "locust"),
            "--html",
            str(out / "report.html"),
            "--only-summary",
            "--stop-timeout",
            "60",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        (out / "locust.log").write_text(result.stdout + result.stderr)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    stats = summarize(out / "locust_stats.csv")
    line = (
        f"loadtest: {stats['requests']} requests, {stats['failures']} failed, {stats['backpressure']} back-pressure "
        f"503s, median {stats['median_ms']:.0f} ms, p95 {stats['p95_ms']:.0f} ms, {stats['requests_per_s']:.2f} "
        f"req/s, {users} users, {duration_s} s against {host}"
    )
    (out / "summary.txt").write_text(line + "\n")
    print(line)
    print(f"reports: {out / 'report.html'}, {out / 'locust_stats.csv'}, {out / 'locust_server_stats.csv'}")
    return 0 if stats["requests"] > 0 and stats["failures"] == 0 and result.returncode == 0 else 1
