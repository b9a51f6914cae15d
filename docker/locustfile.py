"""Load test for rtprune-ocr: users upload sample documents with a mix of modes, pruners and retentions.

    locust -f docker/locustfile.py --host http://localhost:8000            # web UI
    rtprune-ocr loadtest --users 8 --duration 60 --out load-report        # headless, starts a tiny server

Every response is validated. What the server reports about each page (per-stage latency,
visual tokens kept) is collected apart from locust's request statistics, so locust's table
and its aggregated row count HTTP requests only, and written at the end of the run to
``server_stats.csv`` beside ``--csv`` (or the working directory). A 503 with ``Retry-After``
is back-pressure, not a failure: it is counted under its own name and the user waits as told.

Environment: ``RTPRUNE_LOAD_MAX_NEW_TOKENS`` (default 16, keep it small on CPU),
``RTPRUNE_LOAD_MODES`` (default ``tiny,small,base,gundam``), ``RTPRUNE_API_KEY``.
"""

from __future__ import annotations

import csv
import os
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path

from locust import HttpUser, between, events, task

SAMPLES = Path(__file__).parent / "samples"
DOCUMENTS = {path.name: path.read_bytes() for path in sorted(SAMPLES.iterdir()) if path.suffix != ".py"}
PDF_PAGES = {"two-pages.pdf": 2}
MODES = os.environ.get("RTPRUNE_LOAD_MODES", "tiny,small,base,gundam").split(",")
PRUNERS = ["rtprune", "rtprune", "rtprune", "none", "norm", "random", "divprune"]  # mostly the product
RETENTIONS = ["auto", "auto", "0.9", "0.8425", "0.7"]
MAX_NEW_TOKENS = os.environ.get("RTPRUNE_LOAD_MAX_NEW_TOKENS", "16")
STAGES = ("queue", "preprocess", "vision", "prune", "prefill", "decode", "total")


SERVER_STATS: dict[str, list[float]] = defaultdict(list)  # "stage:prefill" -> values the server reported


def record(name: str, value: float) -> None:
    """One value the server reported (kept out of locust's request statistics)."""
    SERVER_STATS[name].append(value)


@events.test_stop.add_listener
def write_server_stats(environment, **_) -> None:
    """server_stats.csv: count, median and p95 of every reported value."""
    prefix = getattr(environment.parsed_options, "csv_prefix", None) if environment.parsed_options else None
    path = Path(f"{prefix}_server_stats.csv" if prefix else "server_stats.csv")
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Name", "Count", "Median", "95%"])
        for name, values in sorted(SERVER_STATS.items()):
            ordered = sorted(values)
            p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
            writer.writerow([name, len(ordered), round(statistics.median(ordered), 3), round(p95, 3)])


def validate(body: dict, n_pages: int, form: dict) -> str | None:
    """What is wrong with a 200 response, or None."""
    for key in ("model", "markdown", "pages", "stats", "mode", "pruner"):
        if key not in body:
            return f"missing field {key!r}"
    if len(body["pages"]) != n_pages:
        return f"expected {n_pages} pages, got {len(body['pages'])}"
    if body["mode"] != form["mode"] or body["pruner"] != form["pruner"]:
        return "response does not echo the requested mode and pruner"
    for page in body["pages"]:
        stats = page["stats"]
        if not 0 < stats["visual_tokens_kept"] <= stats["visual_tokens"]:
            return f"bad token counts {stats['visual_tokens_kept']}/{stats['visual_tokens']}"
        if form["pruner"] == "none" and stats["visual_tokens_kept"] != stats["visual_tokens"]:
            return "pruner none pruned tokens"
        if set(STAGES) - set(stats["latency_ms"]):
            return "latency_ms lacks a stage"
    return None


class OcrUser(HttpUser):
    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        key = os.environ.get("RTPRUNE_API_KEY")
        if key:
            self.client.headers["X-API-Key"] = key

    @task
    def ocr_document(self) -> None:
        name, data = random.choice(list(DOCUMENTS.items()))
        form = {
            "mode": random.choice(MODES),
            "pruner": random.choice(PRUNERS),
            "retention": random.choice(RETENTIONS),
            "max_new_tokens": MAX_NEW_TOKENS,
        }
        with self.client.post(
            "/v1/ocr", files={"file": (name, data)}, data=form, name="POST /v1/ocr", catch_response=True, timeout=600
        ) as response:
            if response.status_code == 503 and "Retry-After" in response.headers:
                response.request_meta["name"] = "POST /v1/ocr [503 back-pressure]"
                response.success()
                time.sleep(float(response.headers["Retry-After"]))
                return
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            body = response.json()
            problem = validate(body, PDF_PAGES.get(name, 1), form)
            if problem:
                response.failure(problem)
                return
            response.success()
        for page in body["pages"]:
            stats = page["stats"]
            record(f"visual_tokens_kept [{form['mode']}]", stats["visual_tokens_kept"])
            for stage in STAGES:
                record(f"stage:{stage} ms", stats["latency_ms"][stage])
