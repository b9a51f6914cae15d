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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(base: str, process: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    """Poll ``base``/readyz until it answers 200; fail early if ``process`` (the server) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{base} did not become ready within {timeout:.0f} s")


def _summary(stats_csv: Path) -> dict[str, str]:
    with stats_csv.open() as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    return rows.get("POST /v1/ocr", rows.get("Aggregated", {}))


def run_loadtest(users: int, duration_s: int, out: Path, host: str | None = None, model: str = "tiny") -> int:
    """Run the load test; return 0 only when every request succeeded."""
    if not LOCUSTFILE.exists():
        print(f"error: {LOCUSTFILE} not found; run from a checkout of the repository", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    server = None
    if host is None:
        port = _free_port()
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
                str(max(16, 2 * users)),
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
            str(LOCUSTFILE),
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
    row = _summary(out / "locust_stats.csv")
    requests, failures = int(row.get("Request Count", 0)), int(row.get("Failure Count", 0))
    backpressure = _summary_row(out / "locust_stats.csv", "POST /v1/ocr [503 back-pressure]")
    line = (
        f"loadtest: {requests} requests, {failures} failed, {backpressure} back-pressure 503s, "
        f"median {row.get('Median Response Time', '?')} ms, p95 {row.get('95%', '?')} ms, "
        f"{float(row.get('Requests/s', 0) or 0):.2f} req/s, {users} users, {duration_s} s against {host}"
    )
    (out / "summary.txt").write_text(line + "\n")
    print(line)
    print(f"reports: {out / 'report.html'}, {out / 'locust_stats.csv'}")
    return 0 if requests > 0 and failures == 0 and result.returncode == 0 else 1


def _summary_row(stats_csv: Path, name: str) -> int:
    with stats_csv.open() as handle:
        for row in csv.DictReader(handle):
            if row["Name"] == name:
                return int(row["Request Count"])
    return 0
