"""Durable asynchronous jobs for long documents: submit, poll, stream page events, fetch, cancel."""

from __future__ import annotations

from pathlib import Path

from .runner import JobRunner, stored_page
from .store import Backlog, JobRecord, JobStore, Timing

__all__ = ["Backlog", "JobRecord", "JobRunner", "JobStore", "open_store", "stored_page"]


def open_store(url: str | None, directory: Path, *, on_timing: Timing | None = None) -> JobStore:
    """PostgreSQL when ``url`` is given (``RTPRUNE_JOBS_URL``), else SQLite under ``directory``."""
    if url is None:
        from .sqlite_store import SQLiteStore

        return SQLiteStore(directory, on_timing=on_timing)
    try:
        from .postgres_store import PostgresStore
    except ImportError as exc:
        raise RuntimeError(
            "RTPRUNE_JOBS_URL names a PostgreSQL server, which needs the driver: pip install 'rtprune-ocr[postgres]'"
        ) from exc
    return PostgresStore(url, on_timing=on_timing)
