"""Durable asynchronous jobs for long documents: submit, poll, stream page events, fetch, cancel."""

from .runner import JobRunner, stored_page
from .store import Backlog, JobRecord, JobStore, open_store

__all__ = ["Backlog", "JobRecord", "JobRunner", "JobStore", "open_store", "stored_page"]
