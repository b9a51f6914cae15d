"""What the job runner and the routes need from a job store, and the rules both backends share.

Two backends implement :class:`JobStore`: SQLite (:mod:`.sqlite_store`, the embedded default: a file
under ``RTPRUNE_JOBS_DIR``, no server, replicas on one host) and PostgreSQL (:mod:`.postgres_store`,
``RTPRUNE_JOBS_URL``: replicas on any number of hosts). Every method is synchronous and may block on
the database; the async side calls them in a thread.

A job is run by the one process holding its lease. A lease is free when nobody holds it, when its
time ran out (its holder stopped renewing: crashed, or cut off from the database), or when its holder
ran on this host and its process is gone (a ``kill -9`` here frees its jobs at once).
"""

from __future__ import annotations

import functools
import os
import socket
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

UNFINISHED = ("queued", "running")
STATES = ("queued", "running", "done", "failed", "cancelled")
Notice = Callable[[str, str, dict], None]  # (job id, "page" | "state" | "created", data)
Timing = Callable[[str, float], None]  # (store operation, seconds)


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
    client: str | None = None  # who sent it (ClientShares.client_of): its bytes count against that client's share

    @property
    def page_options(self) -> dict:
        """The options each page runs with (the stored options less the job's warnings and priority)."""
        return {name: value for name, value in self.options.items() if name not in (WARNINGS_KEY, PRIORITY_KEY)}

    @property
    def priority(self) -> str:
        """``batch`` (the default: a job's pages take the turns interactive pages leave) or ``interactive``."""
        return self.options.get(PRIORITY_KEY, "batch")

    @property
    def warnings(self) -> list[str]:
        """The notes on the options made when the job was created (e.g. a capped max_new_tokens): its status
        and result repeat them for as long as the job is kept."""
        return list(self.options.get(WARNINGS_KEY, []))


WARNINGS_KEY = "_warnings"  # stored inside the options object: no column, so no migration on either backend
PRIORITY_KEY = "_priority"  # likewise


@dataclass(frozen=True)
class Backlog:
    """What an operator's dashboard or an autoscaler reads: jobs per state, and when the oldest job
    still queued was created (None when none waits)."""

    jobs: dict[str, int] = field(default_factory=dict)
    oldest_queued: float | None = None


class JobStore(Protocol):
    poll_s: float  # how often a reader looks for news this process was not told of (other processes' pages)

    def create(
        self,
        owner: str,
        options: dict,
        numbers: list[int],
        data: bytes,
        webhook: str | None,
        holder: str | None = None,
        ttl_s: float = 0.0,
        client: str | None = None,
    ) -> JobRecord:
        """A queued job with its upload, stored together: no job row without its bytes. With ``holder``,
        its lease is taken in the same write, so the replica that took the upload runs it (no other
        replica can claim it in between)."""
        ...

    def upload(self, job_id: str) -> bytes: ...

    def get(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        """The job, or None when it does not exist or belongs to another owner."""
        ...

    def set_state(self, job_id: str, state: str, error: str | None = None) -> None:
        """Move an unfinished job to ``state``; a done, failed or cancelled job keeps its state (so a
        replica finishing a page cannot undo a cancel made through another). A final state frees the
        job's lease in the same write."""
        ...

    def save_page(self, job_id: str, position: int, result: str) -> float:
        """Store a finished page once (a second save of the same page keeps the first); its done_at."""
        ...

    def pages(self, job_id: str) -> dict[int, tuple[str, float]]:
        """position -> (result JSON, done_at) of the finished pages."""
        ...

    def done_at(self, job_id: str) -> dict[int, float]:
        """position -> done_at of the finished pages, without their results (progress polls)."""
        ...

    def unfinished(self) -> list[str]: ...

    def count_unfinished(self, owner: str) -> int: ...

    def total_bytes(self, client: str | None = None) -> int:
        """Bytes of the stored uploads (an ended job's are freed), all together or of one client's jobs."""
        ...

    def backlog(self) -> Backlog: ...

    def delete_older_than(self, cutoff: float) -> list[str]:
        """Delete jobs (rows, pages, uploads, leases) last touched before ``cutoff``; their ids."""
        ...

    def claim(self, job_id: str, runner: str, ttl_s: float) -> bool:
        """Take this job's lease for ``runner`` if it is free (or already ``runner``'s); True when held."""
        ...

    def claim_next(self, runner: str, ttl_s: float, busy: Collection[str] = ()) -> str | None:
        """Take the lease of the oldest unfinished job whose lease is free, but for ``busy`` (the jobs
        ``runner`` runs now); its id, or None when there is none."""
        ...

    def renew(self, runner: str, ttl_s: float) -> set[str]:
        """Extend ``runner``'s leases; the ids of the jobs it still holds (a lease lost is a job to stop)."""
        ...

    def release(self, job_id: str, runner: str) -> None: ...

    def watch(self, notice: Notice) -> None:
        """Call ``notice`` (from another thread) on news of any process sharing the store, where the
        backend can tell; readers poll every ``poll_s`` for the rest."""
        ...

    def close(self) -> None: ...


def timed(operation: Callable) -> Callable:
    """Report a store method's duration to the store's ``on_timing`` (the jobs' store-time metric)."""

    @functools.wraps(operation)
    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return operation(self, *args, **kwargs)
        finally:
            if self.on_timing is not None:
                self.on_timing(operation.__name__, time.perf_counter() - start)

    return wrapper


def initial_state(holder: str | None) -> str:
    """A job stored with a replica's lease is running from the start (taking a job marks it running in
    the same write: no separate commit per job for the transition)."""
    return "queued" if holder is None else "running"


def new_job_id() -> str:
    return uuid.uuid4().hex


def runner_name() -> str:
    """A lease holder's name: host and process id (so a crash on this host frees its leases at once),
    plus a random part (a process id is reused). At most 58 characters."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def lease_free(holder: str | None, expires: float | None, now: float, claimant: str) -> bool:
    """May ``claimant`` take a lease held by ``holder`` until ``expires``?"""
    return holder is None or holder == claimant or expires is None or expires < now or not holder_alive(holder)


def holder_alive(runner: str) -> bool:
    """False only when the holder ran on this host and its process is gone; elsewhere its lease's
    time decides."""
    host, _, rest = runner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname()[:40] or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user: alive
        return True
    return True
