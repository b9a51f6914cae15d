"""`rtprune-ocr convert`: a folder of documents to markdown, in this process or through running services,
resumed after a kill with every page done once, and a rerun that has nothing to do loads nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.api.app import create_app
from service.convert.sources import find_sources
from service.settings import ServiceSettings
from tests.helpers import live_server, text_page, text_pdf

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny", "--mode", "tiny", "--max-new-tokens", "4"]


def corpus(folder: Path) -> Path:
    """3 PDFs of 2 pages (two in a subfolder), 2 PNGs and a broken PDF."""
    (folder / "sub").mkdir(parents=True)
    (folder / "a.pdf").write_bytes(text_pdf(2, lines=2))
    (folder / "sub" / "b.pdf").write_bytes(text_pdf(2, lines=3))
    (folder / "sub" / "c.pdf").write_bytes(text_pdf(2, lines=4))
    text_page((400, 300)).save(folder / "d.png")
    text_page((300, 400), lines=3).save(folder / "e.png")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    return folder


def convert(*args: str, env: dict | None = None, cache: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "RTPRUNE_CACHE_DIR": str(cache), **(env or {})}
    command = [sys.executable, "-m", "service.cli", "convert", *args]
    return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=ROOT)


def outputs(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): p.read_text() for p in sorted(out.rglob("*.md"))}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, preset_cache):
    source = corpus(tmp_path_factory.mktemp("corpus"))
    out = tmp_path_factory.mktemp("converted")
    return source, out, convert(str(source), "--out", str(out), *FAST, cache=preset_cache)


def test_a_folder_converts_to_md_and_json_and_a_broken_file_is_reported(converted):
    _, out, run = converted
    assert run.returncode == 1, run.stderr  # one document failed: not a success
    assert sorted(outputs(out)) == ["a.md", "d.md", "e.md", "sub/b.md", "sub/c.md"]  # the folders mirrored
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.json") if ".rtprune" not in str(p)) == [
        "a.json",
        "d.json",
        "e.json",
        "report.json",
        "sub/b.json",
        "sub/c.json",
    ]
    a = json.loads((out / "a.json").read_text())
    assert [p["page"] for p in a["pages"]] == [1, 2] and a["random_weights"] and a["stats"]["pages"] == 2
    assert (out / "a.md").read_text().count("<--- Page Split --->") == 1  # pages joined as the API joins them
    report = json.loads((out / "report.json").read_text())
    assert (report["converted"], report["failed"], report["pages"]) == (5, 1, 8)
    broken = next(d for d in report["documents"] if d["state"] == "failed")
    assert broken["source"].endswith("broken.pdf") and broken["error"]["code"] == "corrupt_file"
    assert "failed: " in run.stderr and "broken.pdf" in run.stderr


def test_a_rerun_converts_nothing_and_never_imports_torch(converted, preset_cache, tmp_path):
    source, out, _ = converted
    before = outputs(out)
    no_torch = tmp_path / "no-torch" / "torch"
    no_torch.mkdir(parents=True)
    (no_torch / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    again = convert(str(source), "--out", str(out), *FAST, cache=preset_cache, env={"PYTHONPATH": str(no_torch.parent)})
    assert again.returncode == 1 and "torch was imported" not in again.stderr, again.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["converted"], report["skipped"], report["failed"]) == (0, 5, 1)
    assert outputs(out) == before


def test_other_options_redo_a_document(converted, preset_cache):
    source, out, _ = converted
    run = convert(str(source / "d.png"), "--out", str(out), *FAST[:-1], "6", cache=preset_cache)
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "d.json").read_text())["pages"][0]["stats"]["output_tokens"] == 6
    assert json.loads((out / "report.json").read_text())["converted"] == 1


def test_a_killed_run_finishes_the_rest_on_rerun_with_every_page_done_once(tmp_path, preset_cache):
    source = tmp_path / "long"
    source.mkdir()
    for name in ("x", "y"):
        (source / f"{name}.pdf").write_bytes(text_pdf(6, lines=2))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "service.cli", "convert", str(source), "--out", str(out), "--model", "tiny"]
    args += ["--mode", "tiny", "--max-new-tokens", "48", "--ngram-size", "0"]
    env = {**os.environ, "RTPRUNE_CACHE_DIR": str(preset_cache), "RTPRUNE_MAX_BATCH_SIZE": "2"}
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pages = out / ".rtprune-convert" / "pages"
    while len(list(pages.rglob("*.json"))) < 3 and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in pages.rglob("*.json")}
    assert 3 <= len(kept) < 12  # killed part of the way
    rerun = convert(
        str(source),
        "--out",
        str(out),
        "--model",
        "tiny",
        "--mode",
        "tiny",
        "--max-new-tokens",
        "48",
        "--ngram-size",
        "0",
        cache=preset_cache,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == kept  # finished pages were not redone
    assert len(list(pages.rglob("*.json"))) == 12
    for name in ("x", "y"):
        document = json.loads((out / f"{name}.json").read_text())
        assert [p["page"] for p in document["pages"]] == [1, 2, 3, 4, 5, 6]
    report = json.loads((out / "report.json").read_text())
    assert report["converted"] == 2 and report["pages"] == 12


def test_through_a_running_service_the_markdown_is_the_in_process_markdown(converted, tiny_engine, tmp_path):
    source, in_process, _ = converted
    settings = ServiceSettings(model="tiny", warmup=False, log_json=False, jobs_dir=tmp_path / "jobs")
    with live_server(create_app(settings, load_engine=lambda: tiny_engine)) as base:
        out = tmp_path / "remote"
        from service.cli import main

        status = main(
            [
                "convert",
                str(source),
                "--out",
                str(out),
                "--url",
                base,
                "--mode",
                "tiny",
                "--max-new-tokens",
                "4",
                "--quiet",
            ]
        )
    assert status == 1  # the broken file, refused by the service with the same reason
    here, there = outputs(in_process), outputs(out)
    here.pop("d.md")  # redone with other options by the test above
    there.pop("d.md")
    assert there == here
    report = json.loads((out / "report.json").read_text())
    broken = next(d for d in report["documents"] if d["state"] == "failed")
    assert broken["error"]["code"] == "corrupt_file"


def test_inputs_are_files_folders_and_globs_and_names_never_collide(tmp_path):
    (tmp_path / "deep" / "er").mkdir(parents=True)
    for name in ("one.pdf", "deep/two.png", "deep/er/three.jpg", "same.pdf", "same.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    sources, problems = find_sources([str(tmp_path)])
    assert sorted(s.name for s in sources) == ["deep/er/three", "deep/two", "one", "same.pdf", "same.png"]
    sources, problems = find_sources([str(tmp_path / "*.pdf"), str(tmp_path / "deep" / "two.png"), "nowhere"])
    assert [s.name for s in sources] == ["one", "same", "two"]
    assert problems == [("nowhere", "no such file, folder or match")]


def test_through_a_service_with_a_key_the_key_comes_from_the_flag_or_the_environment(
    tiny_engine, tmp_path, monkeypatch
):
    from service.cli import main

    page = tmp_path / "p.png"
    text_page((300, 200)).save(page)
    settings = ServiceSettings(model="tiny", warmup=False, log_json=False, jobs_dir=tmp_path / "jobs", api_key="k1")
    args = ["convert", str(page), "--mode", "tiny", "--max-new-tokens", "2", "--quiet"]
    with live_server(create_app(settings, load_engine=lambda: tiny_engine)) as base:
        assert main([*args, "--out", str(tmp_path / "none"), "--url", base]) == 1  # 401: the report says why
        report = json.loads((tmp_path / "none" / "report.json").read_text())
        assert report["documents"][0]["error"]["code"] == "unauthorized"
        assert main([*args, "--out", str(tmp_path / "flag"), "--url", base, "--api-key", "k1"]) == 0
        monkeypatch.setenv("RTPRUNE_API_KEY", "k1")
        assert main([*args, "--out", str(tmp_path / "env"), "--url", base]) == 0


def test_a_service_that_cannot_be_reached_is_a_reported_failure_not_a_traceback(tmp_path):
    from service.cli import main
    from service.loadtest import free_port

    page = tmp_path / "p.png"
    text_page((300, 200)).save(page)
    out = tmp_path / "out"
    assert main(["convert", str(page), "--out", str(out), "--url", f"http://127.0.0.1:{free_port()}", "--quiet"]) == 1
    (document,) = json.loads((out / "report.json").read_text())["documents"]
    assert document["state"] == "failed" and document["error"]["code"] == "unreachable"
