"""The shared job store: PostgreSQL (``RTPRUNE_JOBS_URL``), for replicas on any number of hosts.

Everything of a job lives in the database, the uploaded bytes included (``bytea``, within
``RTPRUNE_JOBS_MAX_BYTES`` in all): a replica that did not take the upload runs it, and a backup of
the database is a backup of every job. An object store would earn its place only for uploads far
larger than the service accepts.

Claims lock the job's row and skip rows another claimant has locked (``FOR UPDATE SKIP LOCKED``), so
replicas never wait on each other nor take one job twice; lease times are the database's clock, not
the hosts'. Every change is announced with ``NOTIFY`` by the statement that makes it (delivered at commit),
so an event stream on any replica hears pages finished on any other at once. A lost connection (the
server restarting) is retried for ``patience_s``, then answered 503: no method half-applies, and
each is safe to repeat.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator
from typing import TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

from service.errors import StoreUnavailable

from .store import UNFINISHED, Backlog, JobRecord, Notice, Timing, holder_alive, initial_state, new_job_id, timed

log = logging.getLogger(__name__)
T = TypeVar("T")
CHANNEL = "rtprune_jobs"
MIGRATION_LOCK = 0x7274_7072  # pg_advisory_xact_lock key: one replica migrates, the others wait for it
NOW = "extract(epoch from clock_timestamp())"  # the database's clock: hosts' clocks may disagree
JOB_COLUMNS = "id, owner, state, created, updated, options, numbers, bytes, error, webhook, client"
NOTIFY = "pg_notify(%s, %s)"  # delivered at commit, and only if the statement changed a row
RUNNING = "CASE WHEN state = 'queued' THEN 'running' ELSE state END"  # taken = running (no extra write)
FREE = f"(runner IS NULL OR runner = %s OR lease_expires < {NOW} OR runner = ANY(%s))"  # a lease one may take
MIGRATIONS = (  # version n is MIGRATIONS[n - 1]; rtprune_schema records each one applied
    """
    CREATE TABLE rtprune_jobs (
        id text PRIMARY KEY, owner text NOT NULL, state text NOT NULL,
        created double precision NOT NULL, updated double precision NOT NULL,
        options jsonb NOT NULL, numbers jsonb NOT NULL, bytes bigint NOT NULL, error text, webhook text,
        runner text, lease_expires double precision
    );
    CREATE INDEX rtprune_jobs_unfinished ON rtprune_jobs (created) WHERE state IN ('queued', 'running');
    CREATE INDEX rtprune_jobs_owner ON rtprune_jobs (owner) WHERE state IN ('queued', 'running');
    CREATE INDEX rtprune_jobs_updated ON rtprune_jobs (updated);
    CREATE INDEX rtprune_jobs_runner ON rtprune_jobs (runner);
    CREATE TABLE rtprune_uploads (
        job_id text PRIMARY KEY REFERENCES rtprune_jobs (id) ON DELETE CASCADE, data bytea NOT NULL
    );
    CREATE TABLE rtprune_pages (
        job_id text NOT NULL REFERENCES rtprune_jobs (id) ON DELETE CASCADE, position integer NOT NULL,
        result text NOT NULL, done_at double precision NOT NULL, PRIMARY KEY (job_id, position)
    );
    """,
    """
    ALTER TABLE rtprune_jobs ADD COLUMN client text;
    CREATE INDEX rtprune_jobs_client ON rtprune_jobs (client) WHERE bytes > 0;
    """,
)


class PostgresStore:
    """Job state in one PostgreSQL database, shared by every replica; thread-safe (a connection pool)."""

    poll_s = 1.0  # LISTEN/NOTIFY brings other replicas' news at once; the poll covers a lost listener

    def __init__(
        self, url: str, *, on_timing: Timing | None = None, patience_s: float = 10.0, pool_size: int = 8
    ) -> None:
        self.url, self.on_timing, self.patience_s = url, on_timing, patience_s
        self.where = describe(url)
        self._connections = Connections(url, pool_size)
        self._closed = threading.Event()
        self._listener: threading.Thread | None = None
        try:
            self._call(migrate, transaction=True)
        except StoreUnavailable as exc:
            self._connections.close()
            raise RuntimeError(
                f"cannot reach the job database {self.where} (RTPRUNE_JOBS_URL): {first_line(exc.__cause__ or exc)}"
            ) from exc

    def _call(self, work: Callable[[psycopg.Connection], T], *, transaction: bool = False) -> T:
        """Run ``work`` — in one transaction when it is several statements that belong together (a single
        statement is atomic by itself: one round trip, no BEGIN/COMMIT); a lost connection is retried
        until ``patience_s`` has passed."""
        deadline = time.monotonic() + self.patience_s
        delay = 0.05
        while True:
            try:
                wait = max(0.1, deadline - time.monotonic())
                with self._connections.connection(timeout=wait, transaction=transaction) as conn:
                    return work(conn)
            except psycopg.OperationalError as exc:
                if self._closed.is_set() or time.monotonic() + delay > deadline:
                    raise StoreUnavailable(
                        f"the job database ({self.where}) did not answer; retry shortly", headers={"Retry-After": "5"}
                    ) from exc
                log.warning("job database %s: %s; retrying", self.where, first_line(exc))
                time.sleep(delay)
                delay = min(2 * delay, 1.0)

    @property
    def schema_version(self) -> int:
        return self._call(lambda c: c.execute("SELECT MAX(version) FROM rtprune_schema").fetchone()[0])

    @timed
    def create(
        self, owner: str, options: dict, numbers: list[int], data: bytes, webhook: str | None,
        holder: str | None = None, ttl_s: float = 0.0, client: str | None = None,
    ) -> JobRecord:
        job_id, now = new_job_id(), time.time()
        query = (
            f"WITH job AS (INSERT INTO rtprune_jobs ({JOB_COLUMNS}, runner, lease_expires) "
            f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, NULL, %s, %s, %s, CASE WHEN %s THEN {NOW} + %s END) "
            "ON CONFLICT (id) DO NOTHING RETURNING id), "  # a retry after a commit whose answer was lost
            "upload AS (INSERT INTO rtprune_uploads SELECT id, %b FROM job) "
            f"SELECT {NOTIFY} FROM job"
        )
        state = initial_state(holder)
        params = (job_id, owner, state, now, now, Jsonb(options), Jsonb(numbers), len(data), webhook, client)
        lease = (holder, holder is not None, ttl_s)
        self._call(lambda c: c.execute(query, (*params, *lease, data, CHANNEL, news(job_id, "created"))))
        return JobRecord(job_id, owner, state, now, now, options, numbers, len(data), None, webhook, client)

    @timed
    def upload(self, job_id: str) -> bytes:
        query = "SELECT data FROM rtprune_uploads WHERE job_id = %s"
        return bytes(self._call(lambda c: c.execute(query, (job_id,), binary=True).fetchone()[0]))

    def get(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        query = f"SELECT {JOB_COLUMNS} FROM rtprune_jobs WHERE id = %s"
        row = self._call(lambda c: c.execute(query, (job_id,)).fetchone())
        if row is None or (owner is not None and row[1] != owner):
            return None
        return JobRecord(*row)

    @timed
    def set_state(self, job_id: str, state: str, error: str | None = None) -> None:
        query = (  # an ended job needs neither its lease nor its upload: both go in the same statement
            "WITH job AS (UPDATE rtprune_jobs SET state = %(state)s, error = %(error)s, updated = %(now)s, "
            "runner = CASE WHEN %(final)s THEN NULL ELSE runner END, "
            "lease_expires = CASE WHEN %(final)s THEN NULL ELSE lease_expires END, "
            "bytes = CASE WHEN %(final)s THEN 0 ELSE bytes END "
            "WHERE id = %(job)s AND state = ANY(%(unfinished)s) RETURNING id), "
            "freed AS (DELETE FROM rtprune_uploads WHERE %(final)s AND job_id IN (SELECT id FROM job)) "
            "SELECT pg_notify(%(channel)s, %(news)s) FROM job"
        )
        params = {
            "state": state, "error": error, "now": time.time(), "final": state not in UNFINISHED, "job": job_id,
            "unfinished": list(UNFINISHED), "channel": CHANNEL, "news": news(job_id, "state", state=state, error=error),
        }
        self._call(lambda c: c.execute(query, params))

    @timed
    def save_page(self, job_id: str, position: int, result: str) -> float:
        """One statement: store the page unless stored, touch the job, announce the page with the first
        save's done_at (a repeat announces it again, harmlessly)."""
        query = (
            "WITH new AS (INSERT INTO rtprune_pages VALUES (%(job)s, %(position)s, %(result)s, %(now)s) "
            "ON CONFLICT DO NOTHING RETURNING done_at), "
            "page AS (SELECT done_at FROM new UNION ALL "
            "SELECT done_at FROM rtprune_pages WHERE job_id = %(job)s AND position = %(position)s LIMIT 1), "
            "job AS (UPDATE rtprune_jobs SET updated = GREATEST(updated, (SELECT done_at FROM page)) "
            "WHERE id = %(job)s) "
            "SELECT done_at, pg_notify(%(channel)s, json_build_object("
            "'job', %(job)s::text, 'event', 'page', 'position', %(position)s::int, 'done_at', done_at)::text) "
            "FROM page"
        )
        params = {"job": job_id, "position": position, "result": result, "now": time.time(), "channel": CHANNEL}
        return self._call(lambda c: c.execute(query, params).fetchone()[0])

    def pages(self, job_id: str) -> dict[int, tuple[str, float]]:
        query = "SELECT position, result, done_at FROM rtprune_pages WHERE job_id = %s"
        rows = self._call(lambda c: c.execute(query, (job_id,)).fetchall())
        return {position: (result, done_at) for position, result, done_at in rows}

    def done_at(self, job_id: str) -> dict[int, float]:
        query = "SELECT position, done_at FROM rtprune_pages WHERE job_id = %s"
        return dict(self._call(lambda c: c.execute(query, (job_id,)).fetchall()))

    def unfinished(self) -> list[str]:
        query = "SELECT id FROM rtprune_jobs WHERE state = ANY(%s) ORDER BY created"
        return [job_id for (job_id,) in self._call(lambda c: c.execute(query, (list(UNFINISHED),)).fetchall())]

    def count_unfinished(self, owner: str) -> int:
        query = "SELECT COUNT(*) FROM rtprune_jobs WHERE owner = %s AND state = ANY(%s)"
        return self._call(lambda c: c.execute(query, (owner, list(UNFINISHED))).fetchone()[0])

    def total_bytes(self, client: str | None = None) -> int:
        mine, args = ("WHERE client = %s", (client,)) if client is not None else ("", ())
        query = f"SELECT COALESCE(SUM(bytes), 0)::bigint FROM rtprune_jobs {mine}"
        return self._call(lambda c: c.execute(query, args).fetchone()[0])

    def backlog(self) -> Backlog:
        def work(conn: psycopg.Connection) -> Backlog:
            counts = dict(conn.execute("SELECT state, COUNT(*) FROM rtprune_jobs GROUP BY state").fetchall())
            oldest = conn.execute("SELECT MIN(created) FROM rtprune_jobs WHERE state = 'queued'").fetchone()[0]
            return Backlog(counts, oldest)

        return self._call(work)

    @timed
    def delete_older_than(self, cutoff: float) -> list[str]:
        query = "DELETE FROM rtprune_jobs WHERE updated < %s RETURNING id"  # pages and uploads cascade
        return [job_id for (job_id,) in self._call(lambda c: c.execute(query, (cutoff,)).fetchall())]

    # --- leases: which process runs a job ------------------------------------------------------

    @timed
    def claim(self, job_id: str, runner: str, ttl_s: float) -> bool:
        return self._take_first(runner, ttl_s, "id = %s", (job_id,)) is not None

    @timed
    def claim_next(self, runner: str, ttl_s: float, busy: Collection[str] = ()) -> str | None:
        return self._take_first(runner, ttl_s, "state = ANY(%s) AND NOT (id = ANY(%s))", (list(UNFINISHED), list(busy)))

    def _take_first(self, runner: str, ttl_s: float, where: str, params: tuple) -> str | None:
        """The queue idiom: one UPDATE of the oldest row matching ``where`` whose lease is free and that no
        other claimant has locked; it takes the lease and marks the job running (when queued). Only that
        row is locked, so the rows of jobs running elsewhere never make their page writes wait."""

        def work(conn: psycopg.Connection) -> str | None:
            query = (
                f"UPDATE rtprune_jobs SET runner = %s, lease_expires = {NOW} + %s, state = {RUNNING} WHERE id = ("
                f"SELECT id FROM rtprune_jobs WHERE {where} AND {FREE} ORDER BY created LIMIT 1 "
                "FOR UPDATE SKIP LOCKED) RETURNING id"
            )
            row = conn.execute(query, (runner, ttl_s, *params, runner, dead_holders(conn, runner))).fetchone()
            return row[0] if row else None

        return self._call(work)

    @timed
    def renew(self, runner: str, ttl_s: float) -> set[str]:
        query = f"UPDATE rtprune_jobs SET lease_expires = {NOW} + %s WHERE runner = %s RETURNING id"
        return {job_id for (job_id,) in self._call(lambda c: c.execute(query, (ttl_s, runner)).fetchall())}

    @timed
    def release(self, job_id: str, runner: str) -> None:
        query = "UPDATE rtprune_jobs SET runner = NULL, lease_expires = NULL WHERE id = %s AND runner = %s"
        self._call(lambda c: c.execute(query, (job_id, runner)))

    # --- news from other replicas -----------------------------------------------------------------

    def watch(self, notice: Notice) -> None:
        """Hear every replica's changes (LISTEN) on a connection of its own, reconnecting after a loss."""
        self._listener = threading.Thread(target=self._listen, args=(notice,), name="rtprune-jobs-listen", daemon=True)
        self._listener.start()

    def _listen(self, notice: Notice) -> None:
        lost = False
        while not self._closed.is_set():
            try:
                with psycopg.connect(
                    self.url, autocommit=True, application_name="rtprune-ocr listener", connect_timeout=5
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if lost:
                        log.info("job database %s: listening again", self.where)
                    lost = False
                    while not self._closed.is_set():
                        for message in conn.notifies(timeout=0.5):
                            news = json.loads(message.payload)
                            notice(news.pop("job"), news.pop("event"), news)
            except psycopg.OperationalError as exc:
                if not lost:  # once per outage; readers poll the store meanwhile
                    log.warning("job database %s: listener lost (%s); reconnecting", self.where, first_line(exc))
                lost = True
                self._closed.wait(0.5)
            except Exception:  # a notice callback's error must not end the listener
                log.exception("job database listener")

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._listener.join(timeout=5)
        self._connections.close()


class Connections:
    """A few connections, made on demand by the thread that needs one, and dropped at their first error.

    Why not psycopg_pool: its pool reconnects in the background with a backoff that doubles without a
    cap, so after a minute-long database outage a replica could wait another minute before it writes
    again. Here the store's own retry (at most a second apart) governs reconnection.
    """

    def __init__(self, url: str, size: int) -> None:
        self.url = url
        self._idle: list[psycopg.Connection] = []
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def connection(self, timeout: float, transaction: bool) -> Iterator[psycopg.Connection]:
        """An autocommit connection, or one in a transaction (committed when the block ends, rolled back
        on an error)."""
        if not self._slots.acquire(timeout=timeout):
            raise psycopg.OperationalError("every job-database connection of this replica is busy")
        conn = None
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = psycopg.connect(self.url, autocommit=True, application_name="rtprune-ocr", connect_timeout=5)
            with conn.transaction() if transaction else contextlib.nullcontext():
                yield conn
        except psycopg.OperationalError:
            self._drop(conn)  # and the idle ones: a lost server lost them all
            conn = None
            raise
        finally:
            if conn is not None:
                with self._lock:
                    self._idle.append(conn)
            self._slots.release()

    def _drop(self, conn: psycopg.Connection | None) -> None:
        with self._lock:
            dropped, self._idle = [*self._idle, *([conn] if conn is not None else [])], []
        for each in dropped:
            with contextlib.suppress(Exception):
                each.close()

    def close(self) -> None:
        self._drop(None)


def migrate(conn: psycopg.Connection) -> None:
    """Apply the migrations the database has not seen, in one transaction, one replica at a time."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    conn.execute(
        "CREATE TABLE IF NOT EXISTS rtprune_schema (version integer PRIMARY KEY, applied double precision NOT NULL)"
    )
    version = conn.execute("SELECT COALESCE(MAX(version), 0) FROM rtprune_schema").fetchone()[0]
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute(script)
        conn.execute("INSERT INTO rtprune_schema VALUES (%s, %s)", (number, time.time()))
        log.info("job database: schema migrated to version %d", number)


def dead_holders(conn: psycopg.Connection, runner: str) -> list[str]:
    """Other lease holders on this host whose process is gone (a kill -9 here): their leases are free
    now, not when they expire. Read without locks."""
    query = "SELECT DISTINCT runner FROM rtprune_jobs WHERE state = ANY(%s) AND runner LIKE %s AND runner <> %s"
    local = conn.execute(query, (list(UNFINISHED), runner.partition(":")[0] + ":%", runner)).fetchall()
    return [holder for (holder,) in local if not holder_alive(holder)]


def news(job_id: str, event: str, **data) -> str:
    return json.dumps({"job": job_id, "event": event, **data})


def describe(url: str) -> str:
    """host:port/database of a URL, for messages (never its password)."""
    parts = conninfo_to_dict(url)
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
