"""What a new user meets first: the README's try-out, a fast --help, numbers that explain themselves."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import ServiceSettings
from tests.helpers import serve_process, text_pdf

ROOT = Path(__file__).resolve().parents[1]


def documented(marker: str) -> str:
    """The README and docs/ page holding ``<!-- marker -->``."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return next(text for page in pages if f"<!-- {marker} -->" in (text := page.read_text()))


def readme_block(marker: str) -> list[str]:
    """The command lines of the fenced block after ``<!-- marker -->`` in the README or docs/."""
    text = documented(marker)
    block = text.split(f"<!-- {marker} -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split(" #")[0].strip() for line in block.strip().splitlines() if line.strip()]


def test_the_readme_try_out_answers_with_a_labelled_page_and_a_clean_log(preset_cache, tmp_path):
    """`serve --model tiny`, then the README's curl of the shipped sample (tests/test_docs.py runs the
    block whole; this reads the answer and the server's log)."""
    serve_line, wait_line, curl_line = readme_block("try-out")
    assert serve_line.startswith("rtprune-ocr serve --model tiny") and curl_line.startswith("curl ")
    assert "/readyz" in wait_line and "--retry" in wait_line  # the try-out waits until the model is ready
    serve_line = serve_line.removesuffix("&").strip()
    log_path = tmp_path / "server.log"
    with serve_process(preset_cache, *shlex.split(serve_line)[2:], log_path=log_path) as (base, _, _):
        curl = shlex.split(curl_line.replace("http://localhost:8000", base))
        result = subprocess.run(curl, cwd=ROOT, capture_output=True, text=True)
        body = json.loads(result.stdout)
        assert body["random_weights"] is True and body["pages"][0]["stats"]["output_tokens"] <= 32
        assert any("max_new_tokens defaults to 32" in w for w in body["warnings"])
    log = log_path.read_text()
    lines = [line for line in log.splitlines() if line.strip()]
    assert "\x1b[" not in log, "log lines carry ANSI colour codes"
    assert all(line.startswith("{") for line in lines), [line for line in lines if not line.startswith("{")][:3]
    messages = " ".join(json.loads(line)["message"] for line in lines)
    assert "instantiate a model of type" not in messages and "tokenizer_class" not in messages


def readme_python(marker: str) -> str:
    """The fenced Python block after ``<!-- marker -->`` in the README or docs/."""
    text = documented(marker)
    return text.split(f"<!-- {marker} -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize(("marker", "printed"), [("chat-example", ""), ("mistral-example", "[0, 1]")])
def test_the_documented_client_examples_print_their_answer(tiny_engine, marker, printed):
    """The OpenAI and Mistral examples, unchanged but for the port, from the checkout as the README says;
    the chat example asks for no max_tokens, so on tiny its page stops at the preset's small default."""
    from tests.helpers import live_server

    settings = ServiceSettings(model="tiny", log_json=False, warmup=False)
    with live_server(create_app(settings, load_engine=lambda: tiny_engine)) as base:
        code = readme_python(marker).replace("http://localhost:8000", base)
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and printed in result.stdout, result.stdout


def test_a_random_preset_caps_any_budget_and_the_page_reads_its_default(client):
    """Random weights never write end-of-text: 8192 asked for means 256 run, said in a warning; /v1/info
    gives the try-out page its default and its cap."""
    info = client.get("/v1/info").json()
    assert info["defaults"]["max_new_tokens"] == 32 and info["limits"]["max_new_tokens"] == 256
    png = (ROOT / "docker" / "samples" / "letter-page.png").read_bytes()
    body = client.post(
        "/v1/ocr", files={"file": ("p.png", png)}, data={"mode": "tiny", "max_new_tokens": "8192", "ngram_size": "0"}
    ).json()
    assert body["pages"][0]["stats"]["output_tokens"] == 256
    assert any("max_new_tokens 8192 is capped at 256" in w for w in body["warnings"]), body["warnings"]


def test_the_cli_takes_page_ranges_and_checks_the_file_before_loading(tmp_path, preset_cache):
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(text_pdf(4, lines=2))
    env = {**os.environ, "RTPRUNE_CACHE_DIR": str(preset_cache)}
    base = [sys.executable, "-m", "service.cli", "ocr", "--model", "tiny", "--mode", "tiny", "--json"]
    ranged = subprocess.run([*base, str(pdf), "--page", "2-3", "--max-new-tokens", "2"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert ranged.returncode == 0, ranged.stderr
    assert [json.loads(line)["page"] for line in ranged.stdout.splitlines()] == [2, 3]
    assert "Loading weights" not in ranged.stderr  # no progress bar on every run
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    # before torch and the model (seconds on a busy machine): a torch that cannot be imported changes nothing
    env["PYTHONPATH"] = str(without_torch(tmp_path))
    for path, problem in [(empty, "the file is empty"), (tmp_path / "missing.png", "No such file")]:
        run = subprocess.run([*base, str(path)], capture_output=True, text=True, env=env, cwd=ROOT)
        assert run.returncode == 2 and problem in run.stderr and "upload" not in run.stderr, run.stderr
    bad = subprocess.run([*base, str(pdf), "--retention", "3"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert bad.returncode == 2 and "retention must be a number in (0, 1]" in bad.stderr, bad.stderr


def without_torch(folder: Path) -> Path:
    """A folder to put first on PYTHONPATH whose ``torch`` fails to import, saying so."""
    package = folder / "no-torch" / "torch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    return package.parent


def test_help_never_imports_torch():
    code = (
        "import sys, contextlib, io\n"
        "from service.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    main(['serve', '--help'])\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'help imported torch'\n"
        "print(out.getvalue())\n"
    )
    env = {**os.environ, "COLUMNS": "200"}  # one option a line, whatever the terminal
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert "--warmup, --no-warmup" in result.stdout and "{continuous,static}" in result.stdout
    assert "VALUE" not in result.stdout and "default 128" in result.stdout


def test_a_near_miss_preset_name_gets_a_suggestion():
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "ocr", "x.png", "--model", "tinyy"], capture_output=True, text=True
    )
    # the image does not exist: the options and the file are checked before any model is loaded
    assert result.returncode == 2 and "x.png" in result.stderr
    from service.engine.weights.loading import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="did you mean 'tiny'"):
        load_model("tinyy", device="cpu")


def test_cli_errors_are_one_human_line(tmp_path):
    page = tmp_path / "p.png"
    page.write_bytes(b"not used")
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "ocr", str(page), "--max-new-tokens", "0"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --max-new-tokens should be greater than or equal to 1"]


def test_cli_does_a_whole_pdf_unless_page_narrows_it(tmp_path, preset_cache):
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(text_pdf(3, lines=3))
    env = {**os.environ, "RTPRUNE_CACHE_DIR": str(preset_cache)}
    base = [sys.executable, "-m", "service.cli", "ocr", str(pdf), "--model", "tiny", "--mode", "tiny", "--json"]
    whole = subprocess.run([*base, "--max-new-tokens", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert whole.returncode == 0, whole.stderr
    assert [json.loads(line)["page"] for line in whole.stdout.splitlines()] == [1, 2, 3]
    one = subprocess.run([*base, "--page", "2"], capture_output=True, text=True, env=env, timeout=120)
    pages = [json.loads(line) for line in one.stdout.splitlines()]
    assert [p["page"] for p in pages] == [2] and pages[0]["stats"]["output_tokens"] <= 32
    assert "max_new_tokens defaults to 32" in one.stderr  # random presets stop early, and say so


# --- numbers that explain themselves ---------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_engine):
    app = create_app(ServiceSettings(model="tiny", log_json=False, warmup=False), load_engine=lambda: tiny_engine)
    with TestClient(app) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.02)
        yield client


def test_multi_page_stats_count_shared_batch_work_once(client):
    start = time.perf_counter()
    response = client.post(
        "/v1/ocr",
        files={"file": ("d.pdf", text_pdf(4, lines=3), "application/pdf")},
        data={"mode": "tiny", "max_new_tokens": "12", "ngram_size": "0"},
    )
    wall_ms = (time.perf_counter() - start) * 1e3
    body = response.json()
    total = body["stats"]["latency_ms"]
    stages = ("preprocess", "vision", "prune", "assemble", "prefill", "decode")
    assert total["total"] <= wall_ms
    # each stage's time is the union of its pages' spans: shared work counts once, so no stage exceeds the
    # request's wall time (different stages may overlap: pages are preprocessed while others decode)
    assert all(total[s] <= wall_ms for s in ("queue", *stages))
    page_decode = sum(p["stats"]["latency_ms"]["decode"] for p in body["pages"])
    assert total["decode"] < page_decode  # the four pages decoded together: their steps are shared
    out = body["stats"]["output_tokens"]
    assert out == 4 * 12
    assert body["stats"]["decode_tokens_per_s"] == pytest.approx(out / (total["decode"] / 1e3), rel=1e-3)


def test_retention_means_the_same_in_request_and_response(client):
    body = client.post(
        "/v1/ocr", files={"file": ("d.pdf", text_pdf(1, lines=3))}, data={"mode": "base", "retention": "0.5"}
    ).json()
    stats = body["pages"][0]["stats"]
    assert stats["retention"] == 0.5 == body["stats"]["retention"]  # asked 0.5, reported 0.5
    assert stats["visual_share"] > 0.5  # newlines and the separator are never pruned
    assert stats["grid_tokens_kept"] == stats["grid_tokens"] // 2


def test_an_ignored_option_is_named_in_the_warnings(client):
    body = client.post(
        "/v1/ocr",
        files={"file": ("d.pdf", text_pdf(1, lines=3))},
        data={"mode": "tiny", "pruner": "none", "retention": "0.5", "max_crops": "4", "max_new_tokens": "2"},
    ).json()
    warnings = " | ".join(body["warnings"])
    assert "retention is ignored with pruner=none" in warnings
    assert "max_crops is ignored in mode 'tiny'" in warnings
    assert "max_new_tokens defaults" not in warnings  # it was set explicitly
    assert re.search(r"RANDOM weights", warnings)


def test_docs_need_no_internet(client):
    for path in ("/docs", "/redoc"):
        page = client.get(path).text
        assert "cdn" not in page.lower() and "/static/docs/" in page
        for asset in re.findall(r'(/static/docs/[\w.-]+)"', page):
            assert client.get(asset).status_code == 200, asset


def test_threads_default_to_the_usable_cpus():
    from service.settings import usable_cpus

    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)
    assert ServiceSettings(threads=3).threads == 3
    with pytest.raises(ValueError):
        ServiceSettings(threads=0)


def test_the_loadtest_extra_is_complete():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["load"]
    assert any(e.startswith("httpx") for e in extras) and any(e.startswith("locust") for e in extras)
    assert httpx  # the module loadtest imports is importable


def test_a_queue_smaller_than_the_largest_document_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="raise RTPRUNE_QUEUE_SIZE"):
        ServiceSettings(queue_size=10, max_pdf_pages=50)


@pytest.fixture(scope="module")
def tried(tiny_engine, tmp_path_factory):
    """A service as a new user first meets it: the tiny preset, jobs on, nothing else set."""
    jobs = tmp_path_factory.mktemp("jobs")
    settings = ServiceSettings(model="tiny", warmup=False, log_json=False, jobs_dir=jobs)
    with TestClient(create_app(settings, load_engine=lambda: tiny_engine)) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.05)
        yield client


def test_every_json_answer_ends_with_a_newline_and_the_page_has_an_icon(tried):
    png = (ROOT / "docker/samples/letter-page.png").read_bytes()
    for answer in (
        tried.get("/v1/info"),
        tried.post("/v1/ocr", files={"file": ("p.png", png)}, data={"mode": "tiny", "max_new_tokens": "2"}),
        tried.post("/v1/ocr", files={"file": ("p.png", png)}, data={"retention": "2"}),
        tried.get("/v1/nowhere"),
    ):
        assert answer.content.endswith(b"}\n"), answer.content[-40:]
    icon = tried.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert 'rel="icon"' in tried.get("/").text


def test_a_bad_page_range_names_its_field_and_a_bad_value_is_said_once(tried):
    pdf = (ROOT / "docker/samples/two-pages.pdf").read_bytes()
    outside = tried.post("/v1/ocr", files={"file": ("d.pdf", pdf)}, data={"pages": "5-9"}).json()
    assert outside["error"]["param"] == "pages" and outside["detail"][0]["loc"] == ["body", "pages"]
    refused = tried.post("/v1/ocr", files={"file": ("d.pdf", pdf)}, data={"retention": "2"})
    sentence = "retention must be a number in (0, 1] or 'auto'; got 2"
    assert refused.json()["error"]["message"] == sentence and refused.text.count(sentence) == 2  # message + detail
    assert "details" not in refused.json()["error"]


def test_a_jobs_warnings_stay_on_its_status_and_result(tried):
    pdf = (ROOT / "docker/samples/two-pages.pdf").read_bytes()
    form = {"mode": "tiny", "max_new_tokens": "8192", "ngram_size": "0"}
    created = tried.post("/v1/jobs", files={"file": ("d.pdf", pdf)}, data=form).json()
    capped = next(w for w in created["warnings"] if "max_new_tokens 8192 is capped" in w)
    while (status := tried.get(f"/v1/jobs/{created['id']}").json())["state"] not in ("done", "failed"):
        time.sleep(0.1)
    assert status["state"] == "done" and capped in status["warnings"]
    assert capped in tried.get(f"/v1/jobs/{created['id']}/result").json()["warnings"]
