"""Shared test fixtures and the hypothesis profile (helpers that tests import are in ``helpers.py``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Reproducible in CI (no example database, derandomised); explorative locally.
settings.register_profile("ci", deadline=None, print_blob=True, derandomize=True, database=None, max_examples=60)
settings.register_profile("dev", deadline=None, print_blob=True, max_examples=60)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# Jobs of the apps the tests build go to a fresh directory, never a user's ~/.cache (tests that check
# durability pass their own).
os.environ.setdefault("RTPRUNE_JOBS_DIR", tempfile.mkdtemp(prefix="rtprune-test-jobs-"))


@pytest.fixture(scope="session")
def preset_cache(tmp_path_factory) -> Path:
    """Where the tiny checkpoint is written once per test session."""
    return tmp_path_factory.mktemp("rtprune-cache")


@pytest.fixture(scope="session")
def tiny_engine(preset_cache):
    from service.engine import OCREngine

    return OCREngine.load("tiny", device="cpu", cache_dir=preset_cache)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (Debian's package) for the session; see tests/postgres_server.py."""
    from tests.postgres_server import PostgresServer

    server = PostgresServer().start()
    yield server
    server.close()


@pytest.fixture
def postgres_url(postgres, request) -> str:
    """A fresh, empty database on the session's server, named after the test."""
    return postgres.database("t_" + request.node.name.replace("[", "_").replace("]", "").lower()[:50])
