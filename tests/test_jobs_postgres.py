"""Durable jobs past one host: service processes sharing one real PostgreSQL server (RTPRUNE_JOBS_URL).

Each test starts `rtprune-ocr serve` processes as a user would, on the tiny preset; "exactly once" is
read from the replicas' own page counters (``rtprune_pages_total``), which count every page a model
ran, so a page computed twice would show.
"""

from __future__ import annotations

import contextlib
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest

from tests.helpers import serve_process, sse_events, text_pdf
from tests.postgres_server import PostgresServer

SLOW = {"mode": "tiny", "max_new_tokens": "150", "ngram_size": "0"}  # a second or more per page on 2 cores
QUICK = {"mode": "tiny", "max_new_tokens": "5"}
pytestmark = pytest.mark.slow


def replica(preset_cache, url: str, tmp_path, name: str, *flags: str, host: str | None = None):
    """A `serve` process on the store at ``url``; with ``host``, on a host of that name (its own UTS
    namespace: the hostname is all a lease holder's host is known by)."""
    args = ("--model", "tiny", "--device", "cpu", "--max-batch-size", "1", "--no-warmup", "--jobs-url", url, *flags)
    launcher = ("unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh") if host else ()
    log = tmp_path / f"{name}.log"
    return serve_process(preset_cache, *args, "--jobs-dir", str(tmp_path / name), log_path=log, launcher=launcher)


def pages_run(base: str) -> int:
    """Pages this replica's model ran, from its metrics."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return int(sum(float(n) for n in re.findall(r"^rtprune_pages_total\{[^}]*\} (\S+)$", text, re.M)))


def holder_pid(url: str, job_id: str) -> int | None:
    """The process id of the replica holding the job's lease (runner names are host:pid:random)."""
    with psycopg.connect(url) as conn:
        (runner,) = conn.execute("SELECT runner FROM rtprune_jobs WHERE id = %s", (job_id,)).fetchone()
    return int(runner.split(":")[1]) if runner else None


def wait_for(check, timeout: float = 180, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)
    return value


def status(base: str, job_id: str) -> dict:
    return httpx.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()


def test_two_replicas_share_a_12_page_job_and_the_survivor_of_a_kill_9_finishes_it(
    preset_cache, postgres_url, tmp_path
):
    with contextlib.ExitStack() as stack:
        bases = {}
        for name in ("a", "b"):
            base, _, process = stack.enter_context(replica(preset_cache, postgres_url, tmp_path, name))
            bases[process.pid] = (base, process)
        first = next(iter(bases.values()))[0]
        created = httpx.post(f"{first}/v1/jobs", files={"file": ("d.pdf", text_pdf(12, lines=3))}, data=SLOW)
        job_id = created.json()["id"]
        holder = wait_for(lambda: holder_pid(postgres_url, job_id))
        (survivor, _), (_, doomed) = bases.pop(next(p for p in bases if p != holder)), bases[holder]
        wait_for(lambda: status(survivor, job_id)["pages_done"] >= 1)
        doomed.send_signal(signal.SIGKILL)  # no shutdown, no lease released
        doomed.wait(10)
        before = {p["page"]: p["done_at"] for p in status(survivor, job_id)["pages"] if p["done_at"]}
        assert 1 <= len(before) < 12
        final = wait_for(lambda: (s := status(survivor, job_id))["state"] in ("done", "failed") and s)
        result = httpx.get(f"{survivor}/v1/jobs/{job_id}/result", timeout=30).json()
        ran_here = pages_run(survivor)
    assert final["state"] == "done" and final["pages_done"] == 12
    after = {p["page"]: p["done_at"] for p in final["pages"]}
    assert all(after[page] == done_at for page, done_at in before.items())  # earlier pages untouched
    assert [p["page"] for p in result["pages"]] == list(range(1, 13))
    assert ran_here == 12 - len(before)  # the survivor ran each missing page once, no stored page again


def test_a_replica_on_another_host_killed_mid_job_is_taken_over_when_its_lease_runs_out(
    preset_cache, postgres_url, tmp_path
):
    """Across hosts a dead holder cannot be seen: its lease must run out (15 s) before a replica adopts
    the job, and not before. Here replica A is busy (``--jobs-concurrency 1``) while B, on another host,
    takes the job; B is killed; A adopts it once the lease has expired and finishes it."""
    with contextlib.ExitStack() as stack:
        busy_one = replica(preset_cache, postgres_url, tmp_path, "a", "--jobs-concurrency", "1")
        here, _, local = stack.enter_context(busy_one)
        there, _, remote = stack.enter_context(replica(preset_cache, postgres_url, tmp_path, "b", host="other-host"))
        pdf = text_pdf(3, lines=3)
        busy = httpx.post(f"{here}/v1/jobs", files={"file": ("d.pdf", pdf)}, data=SLOW).json()["id"]
        wait_for(lambda: holder_pid(postgres_url, busy) == local.pid)
        job_id = httpx.post(f"{there}/v1/jobs", files={"file": ("d.pdf", text_pdf(8, lines=3))}, data=SLOW).json()["id"]
        wait_for(lambda: holder_pid(postgres_url, job_id) == remote.pid and status(here, job_id)["pages_done"] >= 1)
        remote.send_signal(signal.SIGKILL)
        remote.wait(10)
        with psycopg.connect(postgres_url) as conn:
            expires, now = conn.execute(
                "SELECT lease_expires, extract(epoch from clock_timestamp()) FROM rtprune_jobs WHERE id = %s", (job_id,)
            ).fetchone()
            before = dict(conn.execute("SELECT position, done_at FROM rtprune_pages WHERE job_id = %s", (job_id,)))
        wait_for(lambda: holder_pid(postgres_url, job_id) == local.pid, every=0.2)
        with psycopg.connect(postgres_url) as conn:
            adopted_at = conn.execute("SELECT extract(epoch from clock_timestamp())").fetchone()[0]
        final = wait_for(lambda: (s := status(here, job_id))["state"] in ("done", "failed") and s)
        ran_here = pages_run(here)
    assert expires > now  # B's lease was still running when it died ...
    assert adopted_at >= expires  # ... and A took the job only once it had run out
    assert final["state"] == "done" and final["pages_done"] == 8
    after = {p["page"] - 1: p["done_at"] for p in final["pages"]}
    assert all(after[position] == done_at for position, done_at in before.items())
    assert ran_here == 3 + 8 - len(before)  # its own job, and the other job's missing pages once


def test_a_job_on_one_replica_is_read_streamed_and_cancelled_through_the_other(preset_cache, postgres_url, tmp_path):
    with contextlib.ExitStack() as stack:
        bases = {}
        for name in ("a", "b"):
            base, _, process = stack.enter_context(replica(preset_cache, postgres_url, tmp_path, name))
            bases[process.pid] = base
        created = httpx.post(f"{bases[min(bases)]}/v1/jobs", files={"file": ("d.pdf", text_pdf(8, lines=3))}, data=SLOW)
        job_id = created.json()["id"]
        holder = wait_for(lambda: holder_pid(postgres_url, job_id))
        runner, other = bases[holder], next(b for p, b in bases.items() if p != holder)

        delays, ended = [], None
        with httpx.stream("GET", f"{other}/v1/jobs/{job_id}/events", timeout=60) as events:
            for event, data in sse_events(events.iter_lines()):
                if event == "page":
                    delays.append(time.time() - data["done_at"])
                    if len(delays) == 2:  # two pages heard through the other replica: cancel there
                        cancelled = httpx.delete(f"{other}/v1/jobs/{job_id}", timeout=30).json()
                elif event == "end":
                    ended = data
                    break
        assert cancelled["state"] == "cancelled" and ended["state"] == "cancelled"
        assert len(delays) >= 2  # pages finished on one replica reached a stream on the other (bench/jobs.py: delays)
        stopped = wait_for(lambda: (s := status(runner, job_id))["state"] == "cancelled" and s)
        time.sleep(3)  # the replica running it stops within a page
        assert status(other, job_id)["pages_done"] <= stopped["pages_done"] + 1 < 8
        assert httpx.get(f"{runner}/v1/jobs/{job_id}/result", timeout=30).status_code == 409


def test_fifty_jobs_submitted_at_once_to_two_replicas_all_finish_once(preset_cache, postgres_url, tmp_path):
    pdf = text_pdf(1, lines=2)
    with contextlib.ExitStack() as stack:
        bases = [stack.enter_context(replica(preset_cache, postgres_url, tmp_path, n))[0] for n in ("a", "b")]

        def submit(i: int) -> str:
            answer = httpx.post(f"{bases[i % 2]}/v1/jobs", files={"file": ("d.pdf", pdf)}, data=QUICK, timeout=60)
            assert answer.status_code == 202, answer.text
            return answer.json()["id"]

        with ThreadPoolExecutor(10) as pool:
            ids = list(pool.map(submit, range(50)))
        for job_id in ids:
            wait_for(lambda job_id=job_id: status(bases[0], job_id)["state"] == "done", every=0.2)
        results = [httpx.get(f"{bases[1]}/v1/jobs/{job_id}/result", timeout=30).json() for job_id in ids]
        ran = [pages_run(base) for base in bases]
    assert len(set(ids)) == 50 and all(len(result["pages"]) == 1 for result in results)
    assert sum(ran) == 50  # every job's page ran exactly once, on one replica or the other


def test_a_database_restart_mid_job_loses_nothing(preset_cache, tmp_path):
    server = PostgresServer().start()
    try:
        url = server.database("restart")
        with replica(preset_cache, url, tmp_path, "a") as (base, _, _):
            job_id = httpx.post(f"{base}/v1/jobs", files={"file": ("d.pdf", text_pdf(6, lines=3))}, data=SLOW).json()[
                "id"
            ]
            wait_for(lambda: 1 <= status(base, job_id)["pages_done"] < 6)
            server.restart(down_s=3.0)  # sessions cut; pages that finish meanwhile wait to be stored
            with psycopg.connect(url) as conn:
                before = dict(conn.execute("SELECT position, done_at FROM rtprune_pages").fetchall())
            final = wait_for(lambda: (s := status(base, job_id))["state"] in ("done", "failed") and s)
            ran = pages_run(base)
        assert final["state"] == "done" and final["pages_done"] == 6
        after = {p["page"] - 1: p["done_at"] for p in final["pages"]}
        assert all(after[position] == done_at for position, done_at in before.items())
        assert ran == 6  # no page ran twice, none was lost
    finally:
        server.close()


def test_the_metrics_show_the_stores_backlog(preset_cache, postgres_url, tmp_path):
    with replica(preset_cache, postgres_url, tmp_path, "a") as (base, _, _):
        httpx.post(f"{base}/v1/jobs", files={"file": ("d.pdf", text_pdf(1, lines=2))}, data=QUICK)

        def shown() -> dict[str, float] | None:
            text = httpx.get(f"{base}/metrics", timeout=30).text
            counts = dict(re.findall(r'^rtprune_jobs\{state="(\w+)"\} (\S+)$', text, re.M))
            return counts if counts.get("done") == "1.0" else None

        counts = wait_for(shown, timeout=60, every=0.5)  # refreshed with the leases, every few seconds
        text = httpx.get(f"{base}/metrics", timeout=30).text
    assert counts == {"queued": "0.0", "running": "0.0", "done": "1.0", "failed": "0.0", "cancelled": "0.0"}
    assert re.search(r"^rtprune_jobs_oldest_queued_seconds 0\.0$", text, re.M)
    assert re.search(r'^rtprune_job_store_seconds_count\{operation="save_page"\} 1\.0$', text, re.M)
