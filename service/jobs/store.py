"""Durable job records: SQLite (the standard library's, WAL mode) for state and finished pages,
files for the uploaded bytes, both under ``RTPRUNE_JOBS_DIR``.

A page is stored the moment it finishes, so a restart — even ``kill -9`` — loses no finished
page: unfinished jobs resume from the pages not stored yet.

Several processes may share one store (Ray Serve replicas on a host, or on a shared volume): a job
is run by the one process holding its lease, renewed while it runs. A lease whose holder died —
its time ran out, or its process is gone from this host — is taken over by any live process.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, state TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    options TEXT NOT NULL, numbers TEXT NOT NULL, bytes INTEGER NOT NULL, error TEXT, webhook TEXT
);
CREATE TABLE IF NOT EXISTS leases (job_id TEXT PRIMARY KEY, runner TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pages (
    job_id TEXT NOT NULL, position INTEGER NOT NULL, result TEXT NOT NULL, done_at REAL NOT NULL,
    PRIMARY KEY (job_id, position)
);
"""
UNFINISHED = ("queued", "running")


@dataclass(frozen=True)
class JobRecord:
    id: str
    owner: str
    state: str  # queued | running | done | failed | cancelled
    created: float
    updated: float
    options: dict
    numbers: list[int]  # 1-based page numbers in the upload, in order
    bytes: int
    error: str | None
    webhook: str | None


class JobStore:
    """All job state of one service; thread-safe (one connection behind a lock)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.uploads = directory / "uploads"
        self.uploads.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(directory / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")  # other processes sharing the store write too
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def create(self, owner: str, options: dict, numbers: list[int], data: bytes, webhook: str | None) -> JobRecord:
        job_id = uuid.uuid4().hex
        path = self.upload_path(job_id)
        path.write_bytes(data)  # the bytes first: a row never points at a missing file
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, NULL, ?)",
                (job_id, owner, now, now, json.dumps(options), json.dumps(numbers), len(data), webhook),
            )
        return self.get(job_id)

    def upload_path(self, job_id: str) -> Path:
        return self.uploads / job_id

    def get(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or (owner is not None and row[1] != owner):
            return None
        return JobRecord(*row[:5], json.loads(row[5]), json.loads(row[6]), *row[7:])

    def set_state(self, job_id: str, state: str, error: str | None = None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state = ?, error = ?, updated = ? WHERE id = ?", (state, error, time.time(), job_id)
            )

    def save_page(self, job_id: str, position: int, result: str) -> float:
        done_at = time.time()
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO pages VALUES (?, ?, ?, ?)", (job_id, position, result, done_at))
            self._db.execute("UPDATE jobs SET updated = ? WHERE id = ?", (done_at, job_id))
        return done_at

    def pages(self, job_id: str) -> dict[int, tuple[str, float]]:
        """position -> (result JSON, done_at) of the finished pages."""
        with self._lock:
            rows = self._db.execute("SELECT position, result, done_at FROM pages WHERE job_id = ?", (job_id,))
            return {position: (result, done_at) for position, result, done_at in rows.fetchall()}

    def done_at(self, job_id: str) -> dict[int, float]:
        """position -> done_at of the finished pages, without reading their results (progress polls)."""
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

    def total_bytes(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM jobs").fetchone()[0]

    def delete_older_than(self, cutoff: float) -> list[str]:
        """Delete jobs (rows, pages, uploads) last touched before ``cutoff``; returns their ids."""
        with self._lock:
            ids = [i for (i,) in self._db.execute("SELECT id FROM jobs WHERE updated < ?", (cutoff,)).fetchall()]
            for job_id in ids:
                self._db.execute("DELETE FROM pages WHERE job_id = ?", (job_id,))
                self._db.execute("DELETE FROM leases WHERE job_id = ?", (job_id,))
                self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        for job_id in ids:
            self.upload_path(job_id).unlink(missing_ok=True)
        return ids

    # --- leases: which process runs a job ------------------------------------------------------

    def claim(self, job_id: str, runner: str, ttl_s: float) -> bool:
        """Take the job's lease for ``runner`` unless a live process holds it; True when taken."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # the write lock: one claimant at a time, across processes
            try:
                row = self._db.execute("SELECT runner, expires FROM leases WHERE job_id = ?", (job_id,)).fetchone()
                free = row is None or row[0] == runner or row[1] < now or not holder_alive(row[0])
                if free:
                    self._db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)", (job_id, runner, now + ttl_s))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return free

    def renew(self, runner: str, ttl_s: float) -> None:
        with self._lock:
            self._db.execute("UPDATE leases SET expires = ? WHERE runner = ?", (time.time() + ttl_s, runner))

    def release(self, job_id: str, runner: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM leases WHERE job_id = ? AND runner = ?", (job_id, runner))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def runner_name() -> str:
    """A lease holder's name: host and process id (so a crash on this host frees its leases at once),
    plus a random part (a process id is reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_alive(runner: str) -> bool:
    """False only when the holder ran on this host and its process is gone; elsewhere its lease's
    time decides."""
    host, _, rest = runner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user: alive
        return True
    return True
