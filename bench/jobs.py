"""Job stores side by side: SQLite and PostgreSQL, one service process and two sharing the store.

    python -m bench.jobs --out bench/results/jobs_tiny_cpu.json       # tiny, CPU (~6 min)

Each setup starts ``rtprune-ocr serve`` processes as a user would (tiny preset, CPU, the machine's
cores split between them) on one store: a shared ``--jobs-dir`` for SQLite, a database on a local
PostgreSQL server (Debian's package, started here, fsync on) for PostgreSQL. ``--jobs`` one-page jobs
are submitted at once, round-robin over the processes, and each job's event stream is read from the
*other* process (the same one when there is one): so the delay from a page being stored to its SSE
event crossing processes is what is measured (for SQLite, that process polls the file; for
PostgreSQL, NOTIFY). Setups run in rounds with their order rotated (the machine is noisy).

Printed per setup: jobs/s (first submit to last end event), the p50/p95 event delay, and the store's
time per page by operation as the service saw it (each process's ``rtprune_job_store_seconds``: claim,
renew, save the page and publish its event, set the state, read the upload, create) — wall time in a
thread while the model has the two cores, so contention for the CPU is in it. The store's own cost
is measured apart first: the store calls one one-page job makes on the usual path (stored with the
lease of the replica that took it, running from then on; read the upload, save the page, read it
back, done, the result), in a loop with no model, by one thread and by two stores at once (two
replicas); PostgreSQL also on a second server with fsync off, to show how much of its cost is the
disk's commit latency. Raw numbers go to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.batching import percentile
from bench.common import write_json
from service.loadtest import free_port, wait_ready
from tests.helpers import sse_events, text_pdf
from tests.postgres_server import PostgresServer


def start(flags: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "service.cli", "serve", "--model", "tiny", "--device", "cpu", "--no-warmup"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--max-streams-per-client", "1000", *flags]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, process, timeout=180)
    return process, base


def store_seconds(base: str) -> dict[str, tuple[float, int]]:
    """operation -> (seconds, calls) of this process's job store."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    sums = dict(re.findall(r'^rtprune_job_store_seconds_sum\{operation="(\w+)"\} (\S+)$', text, re.M))
    counts = dict(re.findall(r'^rtprune_job_store_seconds_count\{operation="(\w+)"\} (\S+)$', text, re.M))
    return {op: (float(sums[op]), int(float(counts[op]))) for op in sums}


def follow(base: str, job_id: str, record: dict) -> None:
    """Read a job's event stream to its end: when each page event arrived against its done_at."""
    with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", timeout=300) as events:
        for event, data in sse_events(events.iter_lines()):
            if event == "page":
                record.setdefault("delays", []).append(time.time() - data["done_at"])
            elif event == "end":
                record["state"], record["ended"] = data["state"], time.time()
                return


def run_setup(name: str, processes: int, store_flags: list[str], args, folder: Path) -> dict:
    threads = max(1, (os.cpu_count() or 2) // processes)
    started = [start([*store_flags, "--threads", str(threads)], folder / f"{name}-{i}.log") for i in range(processes)]
    try:
        bases = [base for _, base in started]
        pdf = text_pdf(1, lines=2)
        form = {"mode": "tiny", "max_new_tokens": str(args.tokens), "ngram_size": "0"}
        records: list[dict] = []
        followers: list[threading.Thread] = []
        first_submit = time.time()
        with httpx.Client() as client:
            for i in range(args.jobs):
                submit_to, read_from = bases[i % processes], bases[(i + 1) % processes]
                answer = client.post(f"{submit_to}/v1/jobs", files={"file": ("d.pdf", pdf)}, data=form, timeout=60)
                answer.raise_for_status()
                record = {"id": answer.json()["id"]}
                records.append(record)
                followers.append(threading.Thread(target=follow, args=(read_from, record["id"], record)))
                followers[-1].start()
        for follower in followers:
            follower.join()
        wall = max(r["ended"] for r in records) - first_submit
        per_op: dict[str, list[float]] = {}
        for base in bases:
            for op, (seconds, calls) in store_seconds(base).items():
                total = per_op.setdefault(op, [0.0, 0])
                total[0] += seconds
                total[1] += calls
        delays = [d for r in records for d in r.get("delays", [])]
        return {
            "setup": name,
            "processes": processes,
            "jobs": args.jobs,
            "done": sum(r.get("state") == "done" for r in records),
            "wall_s": wall,
            "jobs_per_s": args.jobs / wall,
            "event_delay_p50_ms": percentile(delays, 0.5) * 1e3,
            "event_delay_p95_ms": percentile(delays, 0.95) * 1e3,
            "event_delays_ms": [round(d * 1e3, 2) for d in delays],
            "store_ms_per_page": {op: s * 1e3 / args.jobs for op, (s, _) in sorted(per_op.items())},
            "store_calls": {op: c for op, (_, c) in sorted(per_op.items())},
            "store_ms_per_page_total": sum(s for s, _ in per_op.values()) * 1e3 / args.jobs,
        }
    finally:
        for process, _ in started:
            process.terminate()
        for process, _ in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(30)


RESULT = json.dumps({"markdown": "lorem ipsum " * 200, "stats": {"tokens": list(range(100))}})  # ~3 KB, as a page


def page_cycle(store, runner: str, pdf: bytes) -> None:
    """Every store call of one one-page job taken by the replica that stored it (the usual path): the
    route's and the runner's, from the upload to the result."""
    job = store.create("bench", {"mode": "tiny"}, [1], pdf, None, runner, 15.0)
    store.get(job.id)
    store.done_at(job.id)
    store.upload(job.id)
    store.save_page(job.id, 0, RESULT)
    store.get(job.id)
    store.done_at(job.id)
    store.set_state(job.id, "done")  # frees the lease too
    store.pages(job.id)  # the result, fetched once


def store_alone(open_one, pages: int, replicas: int) -> dict:
    """ms per page of ``page_cycle`` with ``replicas`` stores working at once, and one renew's ms."""
    from service.jobs.store import runner_name

    stores = [open_one() for _ in range(replicas)]
    pdf = text_pdf(1, lines=2)
    try:
        page_cycle(stores[0], runner_name(), pdf)  # connections made, caches warm
        names = [runner_name() for _ in stores]

        def work(index: int) -> None:
            for _ in range(pages // replicas):
                page_cycle(stores[index], names[index], pdf)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(replicas)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        renew_started = time.perf_counter()
        stores[0].renew(names[0], 15.0)
        renew_ms = (time.perf_counter() - renew_started) * 1e3
        return {"ms_per_page": wall * 1e3 / pages, "pages": pages, "replicas": replicas, "renew_ms": renew_ms}
    finally:
        for store in stores:
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40, help="one-page jobs per setup")
    parser.add_argument("--tokens", type=int, default=8, help="new tokens per page (few: the store shows)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--alone-pages", type=int, default=400, help="pages of the store-alone loop")
    parser.add_argument("--out", type=Path, default=Path("bench/results/jobs_tiny_cpu.json"))
    args = parser.parse_args()

    server = PostgresServer(durable=True).start()
    volatile = PostgresServer(durable=False).start()  # the store alone without the disk's commit latency
    folder = Path(tempfile.mkdtemp(prefix="rtprune-bench-jobs-"))
    runs: list[dict] = []
    alone: list[dict] = []
    try:
        from service.jobs import open_store

        for replicas in (1, 2):
            for backend in ("sqlite", "postgres", "postgres, fsync off"):
                servers = {"postgres": server, "postgres, fsync off": volatile}
                url = servers[backend].database(f"alone_{replicas}") if backend in servers else None
                directory = folder / f"alone-{replicas}"
                result = store_alone(lambda: open_store(url, directory), args.alone_pages, replicas)  # noqa: B023
                alone.append({"backend": backend, **result})
                print(
                    f"store alone, {backend:19s} x{replicas}: {result['ms_per_page']:.2f} ms/page "
                    f"(renew {result['renew_ms']:.2f} ms, every 5 s)",
                    flush=True,
                )
        setups = [("sqlite", 1), ("sqlite", 2), ("postgres", 1), ("postgres", 2)]
        for round_ in range(args.rounds):
            for backend, processes in setups[round_ % len(setups) :] + setups[: round_ % len(setups)]:
                name = f"{backend}-{processes}"
                if backend == "sqlite":
                    flags = ["--jobs-dir", str(folder / f"jobs-{name}-{round_}")]
                else:
                    flags = ["--jobs-url", server.database(f"bench_{processes}_{round_}")]
                result = run_setup(name, processes, flags, args, folder)
                result["round"] = round_
                runs.append(result)
                print(
                    f"{name:11s} round {round_}: {result['jobs_per_s']:5.2f} jobs/s, event delay p50 "
                    f"{result['event_delay_p50_ms']:6.1f} ms p95 {result['event_delay_p95_ms']:6.1f} ms, store "
                    f"{result['store_ms_per_page_total']:5.2f} ms/page "
                    + " ".join(f"{op}={ms:.2f}" for op, ms in result["store_ms_per_page"].items()),
                    flush=True,
                )
    finally:
        server.close()
        volatile.close()
    summary = {}
    for name in sorted({r["setup"] for r in runs}):
        mine = [r for r in runs if r["setup"] == name]
        summary[name] = {
            "jobs_per_s": max(r["jobs_per_s"] for r in mine),
            "event_delay_p95_ms": max(r["event_delay_p95_ms"] for r in mine),
            "store_ms_per_page_total": max(r["store_ms_per_page_total"] for r in mine),
        }
    for backend in ("sqlite", "postgres"):
        summary[f"{backend}: 2 processes / 1"] = summary[f"{backend}-2"]["jobs_per_s"] / summary[f"{backend}-1"][
            "jobs_per_s"
        ]
    print(json.dumps(summary, indent=2))
    write_json(
        args.out,
        {"args": vars(args) | {"out": str(args.out)}, "summary": summary, "store_alone": alone, "runs": runs},
    )


if __name__ == "__main__":
    main()
