"""`rtprune-ocr loadtest`: run the locust load test headless and summarise it in one line.

Without ``--host`` it first starts ``rtprune-ocr serve --model tiny`` on a free loopback port
(random weights: this tests the service, not OCR quality) and stops it afterwards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
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


BACKPRESSURE = "POST /v1/ocr [503 back-pressure]"  # the locustfile's name for a 503 with Retry-After


def summarize(stats_json: Path, started: float) -> dict[str, float]:
    """Locust's own final statistics (``--json-file``, written once every user has stopped, so requests
    that end after the run's window count, as in locust's table; the CSV is written before them): every
    HTTP request (the server's reported values are kept out of them), and the back-pressure 503s. The rate
    is over the run, from ``started`` (a wall-clock time) to the last answer."""
    entries = json.loads(stats_json.read_text())
    times: Counter[int] = Counter()
    for entry in entries:
        times.update({int(ms): count for ms, count in entry["response_times"].items()})
    requests = sum(e["num_requests"] for e in entries)
    ended = max((e["last_request_timestamp"] or 0 for e in entries), default=0.0)
    return {
        "requests": requests,
        "failures": sum(e["num_failures"] for e in entries),
        "backpressure": sum(e["num_requests"] for e in entries if e["name"] == BACKPRESSURE),
        "median_ms": percentile(times, 0.5),
        "p95_ms": percentile(times, 0.95),
        "requests_per_s": requests / (ended - started) if ended > started else 0.0,
    }


def percentile(histogram: Counter[int], q: float) -> float:
    """The q-quantile of locust's response-time histogram (milliseconds -> count); 0 when empty."""
    total = sum(histogram.values())
    seen = 0
    for ms in sorted(histogram):
        seen += histogram[ms]
        if seen >= q * total:
            return float(ms)
    return 0.0


def report_folder_problem(out: Path) -> str | None:
    """Why the report cannot be written into ``out`` (made if missing), in one line; None when it can.
    Checked before the run, so a folder the load test cannot write costs a clear error, not a minute of
    load and a traceback at the end (as in a container whose mounted folder belongs to another user)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        owner = f"owned by uid {out.stat().st_uid}; " if out.exists() else ""
        return (
            f"cannot write the load report into {out}: {error.strerror} ({owner}this process runs as uid "
            f"{os.getuid()}); choose another --out, or make the folder writable"
        )
    return None


def give_to_folder_owner(out: Path) -> None:
    """Hand the report's files to the owner of ``out`` when running as root: the compose service runs the
    load test as root so that it can write into ``./load-report`` whoever owns it (Docker makes the folder
    as root when it is missing), and the files then belong to whoever owns the folder, not to root."""
    if os.getuid() != 0:
        return
    folder = out.stat()
    for path in out.iterdir():
        os.chown(path, folder.st_uid, folder.st_gid)


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
    unwritable = report_folder_problem(out)
    if unwritable:
        print(f"error: {unwritable}", file=sys.stderr)
        return 2
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
            "--json-file",
            str(out / "locust_stats"),  # locust adds .json
            "--html",
            str(out / "report.html"),
            "--only-summary",
            "--stop-timeout",
            "60",
        ]
        started = time.time()
        result = subprocess.run(command, capture_output=True, text=True)
        (out / "locust.log").write_text(result.stdout + result.stderr)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    stats = summarize(out / "locust_stats.json", started)
    line = (
        f"loadtest: {stats['requests']} requests, {stats['failures']} failed, {stats['backpressure']} back-pressure "
        f"503s, median {stats['median_ms']:.0f} ms, p95 {stats['p95_ms']:.0f} ms, {stats['requests_per_s']:.2f} "
        f"req/s, {users} users, {duration_s} s against {host}"
    )
    if stats["requests"] < 3 * users:
        needed = 3 * stats["median_ms"] / 1e3 if stats["requests"] else None
        line += (
            f"\nnote: only {stats['requests']} requests for {users} users: too few to measure latency or "
            "throughput; run at least a few requests per user"
            + (f" (--duration {needed:.0f} or more here)" if needed else "")
        )
    (out / "summary.txt").write_text(line + "\n")
    give_to_folder_owner(out)
    print(line)
    print(f"reports: {out / 'report.html'}, {out / 'locust_stats.json'}, {out / 'locust_server_stats.csv'}")
    return 0 if stats["requests"] > 0 and stats["failures"] == 0 and result.returncode == 0 else 1
