"""The job store's contract, on both backends: SQLite (a file, the default) and a real PostgreSQL server.

What the runner and the routes rely on: a job and its upload stored together, a page stored once,
one lease holder per job however many replicas claim at once, a dead holder's jobs adopted, expiry,
migrations that run once, and (PostgreSQL) other replicas' news heard and a restart survived.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from service.errors import StoreUnavailable
from service.jobs import open_store
from service.jobs.sqlite_store import MIGRATIONS as SQLITE_MIGRATIONS
from service.jobs.store import JobStore

HERE = f"{socket.gethostname()[:40]}:{os.getpid()}"


@pytest.fixture(params=["sqlite", "postgres"])
def stores(request, tmp_path):
    """Two stores on one database, as two replicas have them."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    opened = [open_store(url, tmp_path) for _ in range(2)]
    yield opened
    for store in opened:
        store.close()


def test_a_job_is_stored_with_its_upload_and_belongs_to_its_owner(stores):
    first, second = stores
    job = first.create("alice", {"mode": "tiny"}, [2, 3], b"%PDF-bytes\x00\xff", "https://example.org/hook")
    seen = second.get(job.id)
    assert seen == job and seen.state == "queued" and seen.options == {"mode": "tiny"} and seen.numbers == [2, 3]
    assert second.upload(job.id) == b"%PDF-bytes\x00\xff"  # any replica reads the bytes, byte for byte
    assert second.get(job.id, owner="bob") is None and second.get("nope") is None
    assert second.count_unfinished("alice") == 1 and second.count_unfinished("bob") == 0
    assert second.total_bytes() == len(b"%PDF-bytes\x00\xff")
    second.set_state(job.id, "failed", "why")
    assert (first.get(job.id).state, first.get(job.id).error) == ("failed", "why")
    assert first.count_unfinished("alice") == 0
    assert first.total_bytes() == 0 and first.get(job.id).bytes == 0  # an ended job's upload is freed at once


def test_uploads_are_counted_per_client_who_sent_them(stores):
    first, second = stores
    mine = first.create("shared-key", {}, [1], b"12345", None, client="address:10.0.0.1")
    first.create("shared-key", {}, [1], b"123", None, client="address:10.0.0.2")
    assert second.get(mine.id).client == "address:10.0.0.1"
    assert second.total_bytes("address:10.0.0.1") == 5 and second.total_bytes("address:10.0.0.2") == 3
    assert second.total_bytes() == 8 and second.total_bytes("address:10.0.0.3") == 0
    second.set_state(mine.id, "cancelled")
    assert first.total_bytes("address:10.0.0.1") == 0 and first.total_bytes() == 3


def test_a_finished_or_cancelled_job_keeps_its_state(stores):
    first, second = stores
    runner = f"{HERE}:first"
    job = first.create("alice", {}, [1], b"x", None, holder=runner, ttl_s=30)
    second.set_state(job.id, "cancelled")  # through another replica, while the first starts it
    assert first.renew(runner, 30) == set()  # a final state frees the lease: the runner learns to stop
    first.set_state(job.id, "running")
    first.set_state(job.id, "done")
    assert second.get(job.id).state == "cancelled"


def test_a_page_is_stored_once_and_the_first_result_stays(stores):
    first, second = stores
    job = first.create("alice", {}, [1, 2], b"x", None)
    done_at = first.save_page(job.id, 1, '{"text": "first"}')
    assert second.save_page(job.id, 1, '{"text": "second"}') == done_at  # a repeat keeps the first
    assert second.pages(job.id) == {1: ('{"text": "first"}', done_at)}
    assert first.done_at(job.id) == {1: done_at}
    assert first.get(job.id).updated >= done_at


def test_one_runner_holds_a_jobs_lease_until_it_stops_renewing_or_its_process_is_gone(stores):
    """Replicas never run one job twice; a dead holder's jobs are adopted."""
    first, second = stores
    job = first.create("anyone", {}, [1], b"%PDF", None)
    alive = f"{HERE}:a"
    assert first.claim(job.id, alive, ttl_s=30)
    assert not second.claim(job.id, "other-host:1:b", ttl_s=30)  # held by a live runner
    assert first.claim(job.id, alive, ttl_s=30)  # its holder may claim it again
    assert first.renew(alive, ttl_s=-1) == {job.id}  # stopped renewing: the lease ran out
    assert second.claim(job.id, "other-host:1:b", ttl_s=30)
    assert first.renew(alive, ttl_s=30) == set()  # the old holder learns it lost the job
    second.release(job.id, "other-host:1:b")

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = f"{socket.gethostname()[:40]}:{gone.pid}:c"  # a process of this host that has exited (kill -9 alike)
    assert first.claim(job.id, dead, ttl_s=3600)
    assert second.claim(job.id, alive, ttl_s=30)  # taken over at once, long before the hour is up
    first.delete_older_than(time.time() + 1)
    assert first.get(job.id) is None and second.renew(alive, 30) == set()  # deleted with its job


def test_the_next_free_job_is_the_oldest_and_a_runners_own_running_jobs_are_skipped(stores):
    first, second = stores
    older = first.create("a", {}, [1], b"1", None)
    newer = first.create("a", {}, [1], b"2", None)
    me, other = f"{HERE}:me", "other-host:9:x"
    assert first.claim_next(me, 30) == older.id
    assert second.claim_next(other, 30) == newer.id  # the older one is held: the next one
    assert second.claim_next(other, 30, busy={newer.id}) is None
    first.set_state(older.id, "done")
    first.release(older.id, me)
    assert first.claim_next(me, 30) is None  # finished jobs are never claimed
    second.renew(other, ttl_s=-1)
    assert first.claim_next(me, 30) == newer.id  # expired: adopted


def test_a_job_stored_with_its_takers_lease_is_not_claimed_by_another_replica(stores):
    first, second = stores
    job = first.create("a", {}, [1], b"x", None, holder=f"{HERE}:taker", ttl_s=30)
    assert second.claim_next("other-host:2:x", 30) is None  # no window between storing and taking
    assert first.renew(f"{HERE}:taker", 30) == {job.id}


def test_replicas_claiming_at_once_take_each_job_exactly_once(stores):
    first, second = stores
    jobs = {first.create("a", {}, [1], b"x", None).id for _ in range(30)}
    taken: list[str] = []

    def claim_all(store: JobStore, name: str) -> None:
        mine: set[str] = set()  # a runner's running jobs are busy: it takes others
        while (job_id := store.claim_next(name, 60, busy=mine)) is not None:
            mine.add(job_id)
            taken.append(job_id)

    threads = [
        threading.Thread(target=claim_all, args=(store, f"host-{i}:{i}:r"))
        for i, store in enumerate([first, second, first, second])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == sorted(jobs)  # every job once: none lost, none taken twice


def test_expiry_deletes_a_job_with_its_pages_and_upload(stores):
    first, second = stores
    old = first.create("a", {}, [1], b"old", None)
    first.save_page(old.id, 0, "{}")
    cutoff = time.time()
    time.sleep(0.01)
    kept = first.create("a", {}, [1], b"kept", None)
    assert second.delete_older_than(cutoff) == [old.id]
    assert first.get(old.id) is None and first.pages(old.id) == {}
    assert first.total_bytes() == len(b"kept") and first.get(kept.id) is not None


def test_the_backlog_counts_jobs_by_state_and_dates_the_oldest_queued(stores):
    first, second = stores
    assert first.backlog().jobs == {} and first.backlog().oldest_queued is None
    queued = first.create("a", {}, [1], b"x", None)
    running = first.create("a", {}, [1], b"x", None)
    first.set_state(running.id, "running")
    backlog = second.backlog()
    assert backlog.jobs == {"queued": 1, "running": 1} and backlog.oldest_queued == queued.created


def test_sqlite_migrates_a_store_of_the_earlier_version_and_keeps_its_jobs(tmp_path):
    legacy = sqlite3.connect(tmp_path / "jobs.sqlite3")  # the first release's schema, no version recorded
    legacy.executescript(SQLITE_MIGRATIONS[0])
    legacy.execute("INSERT INTO jobs VALUES ('j1', 'a', 'queued', 1, 1, '{}', '[1]', 3, NULL, NULL)")
    legacy.commit()
    legacy.close()
    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "j1").write_bytes(b"old")
    for _ in range(2):  # and a second start changes nothing
        store = open_store(None, tmp_path)
        assert store.schema_version == len(SQLITE_MIGRATIONS) and store.upload("j1") == b"old"
        assert store.unfinished() == ["j1"]
        store.close()


def test_postgres_replicas_starting_together_migrate_once(postgres_url):
    from service.jobs.postgres_store import MIGRATIONS

    opened: list = []
    threads = [threading.Thread(target=lambda: opened.append(open_store(postgres_url, None))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(opened) == 4 and {store.schema_version for store in opened} == {len(MIGRATIONS)}
    for store in opened:
        store.close()


def test_postgres_replicas_hear_each_others_news(postgres_url):
    here, there = open_store(postgres_url, None), open_store(postgres_url, None)
    heard: list[tuple[str, str, dict]] = []
    arrived = threading.Event()

    def notice(job_id: str, event: str, data: dict) -> None:
        heard.append((job_id, event, data))
        if event == "state":
            arrived.set()

    here.watch(notice)
    time.sleep(0.5)  # the listener's LISTEN is in place
    job = there.create("a", {}, [1], b"x", None)
    done_at = there.save_page(job.id, 0, "{}")
    there.set_state(job.id, "done")
    assert arrived.wait(5)
    assert heard == [
        (job.id, "created", {}),
        (job.id, "page", {"position": 0, "done_at": done_at}),
        (job.id, "state", {"state": "done", "error": None}),
    ]
    here.close()
    there.close()


def test_postgres_store_survives_a_server_restart_and_says_503_while_it_is_down(tmp_path):
    from service.jobs.postgres_store import PostgresStore
    from tests.postgres_server import PostgresServer

    server = PostgresServer().start()
    try:
        store = PostgresStore(server.database("restart"), patience_s=1.0)
        job = store.create("a", {}, [1, 2], b"x", None)
        store.save_page(job.id, 0, "{}")
        server.stop()
        with pytest.raises(StoreUnavailable) as down:
            store.save_page(job.id, 1, "{}")
        assert down.value.status == 503 and down.value.headers["Retry-After"]
        assert "restart" in down.value.message and "rtprune@" not in down.value.message
        server.start()
        store.save_page(job.id, 1, "{}")  # the pool replaced its dead connections
        assert sorted(store.done_at(job.id)) == [0, 1]
        store.close()
    finally:
        server.close()


def test_an_unreachable_job_database_stops_the_start_with_a_message_that_hides_the_password():
    from service.jobs.postgres_store import PostgresStore
    from service.loadtest import free_port

    url = f"postgresql://user:s3cret@127.0.0.1:{free_port()}/jobs"
    with pytest.raises(RuntimeError) as failed:
        PostgresStore(url, patience_s=0.5)
    assert f"127.0.0.1:{url.split(':')[3].split('/')[0]}/jobs" in str(failed.value)
    assert "RTPRUNE_JOBS_URL" in str(failed.value) and "s3cret" not in str(failed.value)
