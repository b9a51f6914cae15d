"""The embedded job store: SQLite (the standard library's, WAL mode) for state and finished pages,
files for the uploaded bytes, both under ``RTPRUNE_JOBS_DIR``. No server to run.

A page is stored the moment it finishes, so a restart — even ``kill -9`` — loses no finished page.
Processes on one host may share the directory (Ray Serve replicas): SQLite's file locks order their
claims. Across hosts, use PostgreSQL: SQLite's locking is unreliable on network filesystems.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator
from pathlib import Path

from .store import UNFINISHED, Backlog, JobRecord, Notice, Timing, initial_state, lease_free, new_job_id, timed

MIGRATIONS = (  # version n is MIGRATIONS[n - 1]; PRAGMA user_version records the last one applied
    """
    CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY, owner TEXT NOT NULL, state TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
        options TEXT NOT NULL, numbers TEXT NOT NULL, bytes INTEGER NOT NULL, error TEXT, webhook TEXT
    );
    CREATE TABLE IF NOT EXISTS leases (job_id TEXT PRIMARY KEY, runner TEXT NOT NULL, expires REAL NOT NULL);
    CREATE TABLE IF NOT EXISTS pages (
        job_id TEXT NOT NULL, position INTEGER NOT NULL, result TEXT NOT NULL, done_at REAL NOT NULL,
        PRIMARY KEY (job_id, position)
    );
    """,
    "CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created);",
    "ALTER TABLE jobs ADD COLUMN client TEXT;",
)


class SQLiteStore:
    """All job state under one directory; thread-safe (one connection behind a lock)."""

    poll_s = 0.2  # other processes' pages are seen by polling the file (a cheap local read)

    def __init__(self, directory: Path, *, on_timing: Timing | None = None) -> None:
        self.directory, self.on_timing = directory, on_timing
        self.uploads = directory / "uploads"
        self.uploads.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(directory / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")  # other processes sharing the store write too
        self._lock = threading.Lock()
        self._migrate()

    def _migrate(self) -> None:
        """Apply the migrations this file has not seen, under the write lock (replicas start together)."""
        with self._lock, self._write():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number}")

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """A write transaction that holds SQLite's write lock from its start (one claimant at a time)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self._db.execute("PRAGMA user_version").fetchone()[0]

    @timed
    def create(
        self, owner: str, options: dict, numbers: list[int], data: bytes, webhook: str | None,
        holder: str | None = None, ttl_s: float = 0.0, client: str | None = None,
    ) -> JobRecord:
        job_id = new_job_id()
        (self.uploads / job_id).write_bytes(data)  # the bytes first: a row never points at a missing file
        now = time.time()
        with self._lock, self._write():
            self._db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                (job_id, owner, initial_state(holder), now, now, json.dumps(options), json.dumps(numbers), len(data),
                 webhook, client),
            )
            if holder is not None:
                self._db.execute("INSERT INTO leases VALUES (?, ?, ?)", (job_id, holder, now + ttl_s))
        return self.get(job_id)

    @timed
    def upload(self, job_id: str) -> bytes:
        return (self.uploads / job_id).read_bytes()

    def get(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or (owner is not None and row[1] != owner):
            return None
        return JobRecord(*row[:5], json.loads(row[5]), json.loads(row[6]), *row[7:])

    @timed
    def set_state(self, job_id: str, state: str, error: str | None = None) -> None:
        with self._lock, self._write():
            changed = self._db.execute(
                "UPDATE jobs SET state = ?, error = ?, updated = ? WHERE id = ? AND state IN (?, ?)",
                (state, error, time.time(), job_id, *UNFINISHED),
            ).rowcount
            if changed and state not in UNFINISHED:  # an ended job needs neither its lease nor its upload
                self._db.execute("DELETE FROM leases WHERE job_id = ?", (job_id,))
                self._db.execute("UPDATE jobs SET bytes = 0 WHERE id = ?", (job_id,))
        if changed and state not in UNFINISHED:
            (self.uploads / job_id).unlink(missing_ok=True)

    @timed
    def save_page(self, job_id: str, position: int, result: str) -> float:
        with self._lock, self._write():
            self._db.execute("INSERT OR IGNORE INTO pages VALUES (?, ?, ?, ?)", (job_id, position, result, time.time()))
            query = "SELECT done_at FROM pages WHERE job_id = ? AND position = ?"
            done_at = self._db.execute(query, (job_id, position)).fetchone()[0]  # the first save's, on a repeat
            self._db.execute("UPDATE jobs SET updated = MAX(updated, ?) WHERE id = ?", (done_at, job_id))
        return done_at

    def pages(self, job_id: str) -> dict[int, tuple[str, float]]:
        with self._lock:
            rows = self._db.execute("SELECT position, result, done_at FROM pages WHERE job_id = ?", (job_id,))
            return {position: (result, done_at) for position, result, done_at in rows.fetchall()}

    def done_at(self, job_id: str) -> dict[int, float]:
        with self._lock:
            rows = self._db.execute("SELECT position, done_at FROM pages WHERE job_id = ?", (job_id,))
            return dict(rows.fetchall())

    def unfinished(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE state IN (?, ?) ORDER BY created", UNFINISHED)
            return [job_id for (job_id,) in rows.fetchall()]

    def count_unfinished(self, owner: str) -> int:
        """Jobs of ``owner`` still queued or running (finished, failed and cancelled ones hold no slot)."""
        with self._lock:
            query = "SELECT COUNT(*) FROM jobs WHERE owner = ? AND state IN (?, ?)"
            return self._db.execute(query, (owner, *UNFINISHED)).fetchone()[0]

    def total_bytes(self, client: str | None = None) -> int:
        mine, args = ("WHERE client = ?", (client,)) if client is not None else ("", ())
        with self._lock:
            return self._db.execute(f"SELECT COALESCE(SUM(bytes), 0) FROM jobs {mine}", args).fetchone()[0]

    def backlog(self) -> Backlog:
        with self._lock:
            counts = dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
            oldest = self._db.execute("SELECT MIN(created) FROM jobs WHERE state = 'queued'").fetchone()[0]
        return Backlog(counts, oldest)

    @timed
    def delete_older_than(self, cutoff: float) -> list[str]:
        with self._lock, self._write():
            ids = [i for (i,) in self._db.execute("SELECT id FROM jobs WHERE updated < ?", (cutoff,)).fetchall()]
            for job_id in ids:
                self._db.execute("DELETE FROM pages WHERE job_id = ?", (job_id,))
                self._db.execute("DELETE FROM leases WHERE job_id = ?", (job_id,))
                self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        for job_id in ids:
            (self.uploads / job_id).unlink(missing_ok=True)
        return ids

    # --- leases: which process runs a job ------------------------------------------------------

    @timed
    def claim(self, job_id: str, runner: str, ttl_s: float) -> bool:
        return self._take_first(runner, ttl_s, "jobs.id = ?", (job_id,)) is not None

    @timed
    def claim_next(self, runner: str, ttl_s: float, busy: Collection[str] = ()) -> str | None:
        return self._take_first(runner, ttl_s, "jobs.state IN (?, ?)", UNFINISHED, busy)

    def _take_first(
        self, runner: str, ttl_s: float, where: str, params: tuple, busy: Collection[str] = ()
    ) -> str | None:
        """Under the write lock: the oldest job matching ``where``, not busy, whose lease ``runner`` may
        take; its lease is taken and the job marked running (when queued). Its id, or None."""
        now = time.time()
        query = (
            "SELECT jobs.id, leases.runner, leases.expires FROM jobs LEFT JOIN leases ON leases.job_id = jobs.id "
            f"WHERE {where} ORDER BY jobs.created"
        )
        with self._lock, self._write():
            for job_id, holder, expires in self._db.execute(query, params).fetchall():
                if job_id not in busy and lease_free(holder, expires, now, runner):
                    self._db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)", (job_id, runner, now + ttl_s))
                    self._db.execute("UPDATE jobs SET state = 'running' WHERE id = ? AND state = 'queued'", (job_id,))
                    return job_id
        return None

    @timed
    def renew(self, runner: str, ttl_s: float) -> set[str]:
        with self._lock, self._write():
            self._db.execute("UPDATE leases SET expires = ? WHERE runner = ?", (time.time() + ttl_s, runner))
            return {job_id for (job_id,) in self._db.execute("SELECT job_id FROM leases WHERE runner = ?", (runner,))}

    @timed
    def release(self, job_id: str, runner: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM leases WHERE job_id = ? AND runner = ?", (job_id, runner))

    def watch(self, notice: Notice) -> None:
        """SQLite cannot tell other processes' news: readers poll every ``poll_s``."""

    def close(self) -> None:
        with self._lock:
            self._db.close()

