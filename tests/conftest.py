"""Shared test fixtures and the hypothesis profile."""

from __future__ import annotations

import os

import torch
from hypothesis import settings

# Reproducible in CI (no example database, derandomised); explorative locally.
settings.register_profile("ci", deadline=None, print_blob=True, derandomize=True, database=None, max_examples=60)
settings.register_profile("dev", deadline=None, print_blob=True, max_examples=60)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def v1_block_masks(rows: int, cols: int, with_separator: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """protected/newline masks of a v1 block: `rows` rows of `cols` grid tokens + newline, then a separator."""
    newline = torch.zeros(rows, cols + 1, dtype=torch.bool)
    newline[:, -1] = True
    newline = newline.flatten()
    if with_separator:
        newline = torch.cat([newline, torch.zeros(1, dtype=torch.bool)])
    protected = newline.clone()
    if with_separator:
        protected[-1] = True
    return protected, newline


# --- engine fixtures ---------------------------------------------------------------------------

import socket  # noqa: E402
import threading  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402


@pytest.fixture(scope="session")
def preset_cache(tmp_path_factory) -> Path:  # noqa: F821 - annotation only
    """Where the tiny checkpoint is written once per test session."""
    return tmp_path_factory.mktemp("rtprune-cache")


@pytest.fixture(scope="session")
def tiny_engine(preset_cache):
    from service.engine import OCREngine

    return OCREngine.load("tiny", device="cpu", cache_dir=preset_cache)


def text_page(size: tuple[int, int] = (1100, 800), lines: int = 20) -> Image.Image:
    """A white page with lines of black text, the shape of a real document scan."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    step = max(12, size[1] // (lines + 2))
    for i in range(lines):
        draw.text((40, step * (i + 1)), f"Line {i}: the quick brown fox jumps over the lazy dog.", fill="black")
    return image


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def live_server(app, timeout: float = 60.0):
    """Serve ``app`` with a real uvicorn on a free loopback port until the block ends; yields the base URL."""
    import uvicorn

    from service.loadtest import wait_ready

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=timeout)
        yield base
    finally:
        server.should_exit = True
        thread.join(10)
