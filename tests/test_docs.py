"""Every example a user can copy from README.md and docs/ runs, as written, against the `tiny` preset.

A fenced ``bash`` or ``python`` block runs unless the HTML comment right above it says what it needs
that a test machine lacks (``<!-- needs: gpu -->``, one of :data:`NEEDS`): that marker is the only
way to skip one. Blocks run from a scratch folder that links the checkout's ``docker/`` and
``bench/`` (so the shipped samples are where the docs say), with this venv's ``rtprune-ocr`` and
``python3`` first on the PATH. ``http://localhost:8000`` is a tiny service started for them, except
in a block that starts ``rtprune-ocr serve`` itself: that block gets a free port of its own
(``RTPRUNE_PORT``), and whatever it leaves running is stopped when it ends.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.loadtest import free_port
from tests.helpers import serve_process

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NEEDS = {  # what a marked block needs, and why a test machine cannot give it
    "gpu": "an NVIDIA GPU (or several)",
    "weights": "the real DeepSeek-OCR weights, downloaded from the hub",
    "docker": "a Docker engine and images built for it",
    "network": "downloads beyond the package registries the tests already use",
    "cluster": "hosts of the user's own: a database server, a Ray or Kubernetes cluster",
    "data": "a benchmark's data set, which is research-only and not shipped",
    "setup": "a fresh machine: .ci/run runs the test command itself",
}
RUN = {"bash", "python"}
SHOWN = {"json", "text", "yaml"}  # output and configuration, shown and never run


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    code: str
    needs: str | None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opened = re.match(r"^```(\S*)\s*$", lines[index])
        if not opened:
            index += 1
            continue
        end = next(j for j in range(index + 1, len(lines)) if lines[j].startswith("```"))
        comments, above = [], index - 1
        while above >= 0 and lines[above].startswith("<!--"):
            comments.append(lines[above])
            above -= 1
        needs = next((m.group(1) for c in comments if (m := re.match(r"<!-- needs: (\S+) -->", c))), None)
        blocks.append(Block(page, index + 1, opened.group(1), "\n".join(lines[index + 1 : end]) + "\n", needs))
        index = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in fenced_blocks(page)]
RUNNABLE = [block for block in BLOCKS if block.language in RUN and block.needs is None]


def test_every_block_is_run_or_marked_with_a_known_need():
    assert len(RUNNABLE) >= 10  # the parser found the examples
    for block in BLOCKS:
        assert block.language in RUN | SHOWN, f"{block.name}: say what ```{block.language} is (bash, python, json...)"
        assert block.needs is None or block.needs in NEEDS, f"{block.name}: unknown need {block.needs!r}"
        assert block.needs is None or block.language in RUN, f"{block.name}: only runnable blocks need a marker"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("docs")
    for name in ("docker", "bench"):
        (folder / name).symlink_to(ROOT / name)
    return folder


@pytest.fixture(scope="module")
def service(preset_cache, tmp_path_factory):
    jobs = tmp_path_factory.mktemp("jobs")
    args = ("--model", "tiny", "--device", "cpu", "--no-warmup", "--jobs-dir", str(jobs))
    with serve_process(preset_cache, *args) as (_, port, _):
        yield port


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.name for block in RUNNABLE])
def test_the_example_runs_as_written(block, request, scratch, preset_cache, tmp_path):
    starts_a_server = "rtprune-ocr serve" in block.code
    port = free_port() if starts_a_server else request.getfixturevalue("service")
    code = block.code.replace("localhost:8000", f"localhost:{port}")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RTPRUNE_CACHE_DIR": str(preset_cache),
        "RTPRUNE_PORT": str(port),
        "RTPRUNE_DEVICE": "cpu",
        "PYTHONPATH": str(ROOT),
    }
    command = ["bash", "-euo", "pipefail", "-c", code] if block.language == "bash" else [sys.executable, "-c", code]
    output = tmp_path / "output"
    with open(output, "w") as sink:
        process = subprocess.Popen(
            command, cwd=scratch, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            status = process.wait()
        finally:
            with_the_group_stopped(process)
    printed = output.read_text()
    assert status == 0, f"{block.name} exited {status}:\n{printed[-4000:]}"
    assert printed.strip(), f"{block.name} printed nothing"
    assert '{"error":' not in printed, f"{block.name} got an error answer:\n{printed[-4000:]}"


def with_the_group_stopped(process: subprocess.Popen) -> None:
    """Stop what the block left running (a server started with `&`), and wait until it has gone."""
    if process.poll() is None:
        process.kill()
        process.wait()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        for _ in range(600):  # the group is gone once no member is left to signal
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
