"""Durable asynchronous jobs for long documents: submit, poll, stream page events, fetch, cancel."""

from .runner import JobRunner, stored_page
from .store import JobRecord, JobStore

__all__ = ["JobRecord", "JobRunner", "JobStore", "stored_page"]
