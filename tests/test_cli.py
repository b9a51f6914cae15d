"""`rtprune-ocr serve` as a user starts it: a real process on loopback."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from service.loadtest import free_port
from tests.helpers import serve_process, text_page


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", *args]


def test_serve_starts_reports_ready_and_answers(preset_cache, tmp_path):
    log = tmp_path / "server.log"
    args = ("--model", "tiny", "--device", "cpu")
    with serve_process(preset_cache, *args, log_path=log, env={"RTPRUNE_MAX_PDF_PAGES": "3"}) as (base, _, _):
        info = httpx.get(f"{base}/v1/info").json()
        assert info["limits"]["max_pdf_pages"] == 3  # the environment reached the settings
        path = tmp_path / "page.png"
        text_page((500, 400)).save(path)
        response = httpx.post(
            f"{base}/v1/ocr", files={"file": path.open("rb")}, data={"mode": "tiny", "max_new_tokens": "3"}, timeout=60
        )
        assert response.status_code == 200 and response.json()["random_weights"] is True
    assert '"request_id"' in log.read_text()  # structured JSON access log lines


@pytest.mark.parametrize("model", ["/nonexistent/checkpoint"])
def test_serve_exits_nonzero_when_the_model_cannot_load(model):
    result = subprocess.run(
        serve_command("--model", model, "--port", str(free_port())), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "not a checkpoint directory" in result.stdout + result.stderr


def test_the_settings_page_documents_every_setting():
    from pathlib import Path

    from service.settings import ServiceSettings

    page = (Path(__file__).parents[1] / "docs" / "settings.md").read_text()
    for name in ServiceSettings.model_fields:
        assert f"`RTPRUNE_{name.upper()}`" in page, f"docs/settings.md's table lacks RTPRUNE_{name.upper()}"


def test_sigterm_refuses_waiting_requests_and_exits_within_the_grace(preset_cache, tmp_path):
    """A real process: on SIGTERM a waiting request gets 503 at once, a page that would run for ever is
    ended with 503 when the grace period is over, and the process exits by itself."""
    import signal
    import threading
    import time

    args = ("--model", "tiny", "--device", "cpu", "--max-batch-size", "1", "--shutdown-grace-s", "3", "--no-warmup")
    args += ("--random-max-new-tokens", "8192")  # a page that runs for a while
    path = tmp_path / "page.png"
    text_page((500, 400)).save(path)
    answers: dict[str, httpx.Response] = {}

    def post(name: str) -> None:
        data = {"mode": "tiny", "max_new_tokens": "8192", "ngram_size": "0"}
        answers[name] = httpx.post(f"{base}/v1/ocr", files={"file": path.read_bytes()}, data=data, timeout=60)

    with serve_process(preset_cache, *args) as (base, _, process):
        running = threading.Thread(target=post, args=("running",))
        running.start()
        time.sleep(1.0)
        waiting = threading.Thread(target=post, args=("waiting",))
        waiting.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        waiting.join(60)
        assert answers["waiting"].status_code == 503 and answers["waiting"].headers["retry-after"]
        assert "running" not in answers  # at once, while the running page still has its grace period
        running.join(60)
        assert answers["running"].status_code == 503
        assert "grace period" in answers["running"].json()["error"]["message"]
        # uvicorn re-raises the signal it caught once its graceful shutdown is done
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
