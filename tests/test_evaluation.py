"""Evaluation harness: metrics on known strings, and the whole run on synthetic pages with tiny."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from service.evaluation.dataset import load_pages
from service.evaluation.harness import (
    Evaluation,
    Setting,
    engine_runner,
    parse_retentions,
    score_predictions,
    settings_grid,
)
from service.evaluation.metrics import (
    edit_counts,
    normalized_edit_distance,
    set_edit_distance,
)
from service.evaluation.protocols import PROTOCOLS, OmniDocBench, relative
from service.evaluation.synth import make_page, write_pages
from service.evaluation.synth_benchmarks import write_omnidocbench


def test_normalized_edit_distance_known_strings():
    assert normalized_edit_distance("kitten", "sitting") == pytest.approx(3 / 7)
    assert normalized_edit_distance("same", "same") == 0.0
    assert normalized_edit_distance("", "") == 0.0
    assert normalized_edit_distance("abc", "") == 1.0
    # grounding tags are cleaned away before comparing, as OmniDocBench's clean-up does
    tagged = "<|ref|>title<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n# Title"
    assert normalized_edit_distance(tagged, "# Title") == 0.0


def test_set_edit_distance_sums_before_dividing():
    pairs = [edit_counts("abcd", "abcx"), edit_counts("a", "b")]  # (1, 4) and (1, 1)
    assert set_edit_distance(pairs) == pytest.approx(2 / 5)  # not the mean of 1/4 and 1/1


def test_relative_score_is_the_share_of_the_unpruned_accuracy_kept():
    assert relative(0.2, 0.2, "lower") == 1.0
    assert relative(0.3, 0.2, "lower") == pytest.approx(0.7 / 0.8)  # an edit distance counts as accuracy 1 - e
    assert relative(0.45, 0.9, "higher") == pytest.approx(0.5)
    assert relative(1.0, 1.0, "lower") is None  # the unpruned model has no accuracy: no share of it exists


def test_settings_grid_and_retentions():
    grid = settings_grid(["tiny", "small"], ["rtprune", "none", "norm"], parse_retentions("1.0,0.7,auto"))
    assert grid[0] == Setting("tiny", "none", 1.0) and grid[7] == Setting("small", "none", 1.0)
    assert [s.label for s in grid[1:7]] == [
        "tiny/rtprune@1.0",
        "tiny/rtprune@0.7",
        "tiny/rtprune@auto",
        "tiny/norm@1.0",
        "tiny/norm@0.7",
        "tiny/norm@auto",
    ]
    with pytest.raises(ValueError, match="outside"):
        parse_retentions("1.5")


def test_synthetic_pages_have_matching_markdown(tmp_path):
    image, markdown = make_page(0)
    assert image.size in {(850, 1100), (1100, 850), (1240, 1754)}
    assert markdown.startswith("# ") and "| name | value | share |" in markdown
    paths = write_pages(tmp_path, 3)
    pages = load_pages(tmp_path)
    assert [p.page_id for p in pages] == ["page-000", "page-001", "page-002"] and len(paths) == 3
    assert pages[0].truth == paths[0].with_suffix(".md").read_text()


def test_harness_on_tiny_scores_each_setting_relative_to_its_modes_unpruned_run_and_resumes(tiny_engine, tmp_path):
    write_omnidocbench(tmp_path / "data", 2)
    protocol = OmniDocBench()
    pages = protocol.load(tmp_path / "data")
    grid = settings_grid(["tiny"], ["rtprune", "norm"], [1.0, 0.5])
    out = tmp_path / "out"
    key = {"model": tiny_engine.name, "max_new_tokens": 6}
    summary = Evaluation(protocol, pages, grid, engine_runner(tiny_engine, 6), cache_key=key, out=out).run(
        progress=False
    )
    by_label = {f"{r['pruner']}@{r['retention']}": r for r in summary}
    assert by_label["none@1.0"]["relative_text_edit"] == 1.0
    assert by_label["rtprune@1.0"]["relative_text_edit"] == 1.0  # ratio 1 is the identity: the same text
    assert by_label["rtprune@0.5"]["retention_used"] == pytest.approx(0.5, abs=0.02)
    assert by_label["rtprune@0.5"]["visual_tokens_kept"] < by_label["none@1.0"]["visual_tokens_kept"]
    with (out / "pages.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * len(grid)
    assert {"page", "mode", "pruner", "retention", "text_edit", "table_teds", "prefill_ms", "prefill_e2e_ms"} <= set(
        rows[0]
    )
    saved = json.loads((out / "summary.json").read_text())
    assert saved["protocol"] == "omnidocbench" and len(saved["records"]) == len(grid)
    assert {"relative_table_teds", "prefill_speedup", "prompt_tokens", "text_edit_by_category"} <= set(
        saved["records"][0]
    )

    written = out / "predictions" / "tiny_rtprune_0.5"
    assert sorted(path.stem for path in written.glob("*.md")) == sorted(page.page_id for page in pages)
    rescored = score_predictions(protocol, pages, written, tmp_path / "rescored")  # the benchmark's names
    assert rescored["text_edit"] == pytest.approx(by_label["rtprune@0.5"]["text_edit"])

    def no_model(page, setting):
        raise AssertionError("the cached predictions should have been reused")

    again = Evaluation(protocol, pages, grid, no_model, cache_key=key, out=out).run(progress=False)
    assert again == summary


def test_eval_cli_scores_a_folder_of_predictions_without_a_model(tmp_path, capsys):
    from service import cli

    pairs = Path(__file__).parent / "data" / "benchmark_pairs"
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    for path in sorted((pairs / "predictions").glob("*.md"))[:20]:  # four pages left without a prediction
        (predictions / path.name).write_text(path.read_text())
    out = tmp_path / "scored"
    args = ["eval", "--protocol", "omnidocbench", "--data", str(pairs / "OmniDocBench.json")]
    assert cli.main([*args, "--predictions", str(predictions), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "20 pages scored, 4 without a prediction" in printed and "table_teds" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pages"] == 20 and len(summary["missing_predictions"]) == 4
    assert 0 < summary["text_edit"] < 1 and summary["formula_cdm"] is None
    assert summary["match"] == "quick"  # the benchmark's default, as the leaderboard
    assert cli.main([*args, "--predictions", str(predictions), "--out", str(out), "--match", "simple"]) == 0
    assert "matched simple" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["match"] == "simple"
    fox_args = ["eval", "--protocol", "fox", "--data", str(tmp_path / "none.json"), "--predictions", str(predictions)]
    assert cli.main([*fox_args, "--out", str(out)]) == 2  # a missing file is a clear error, not a traceback
    assert "none.json" in capsys.readouterr().err


def test_eval_cli_grid_end_to_end_on_fox(tmp_path, preset_cache, monkeypatch, capsys):
    from service import cli

    monkeypatch.setattr("service.engine.weights.presets.default_cache_dir", lambda: preset_cache)
    assert cli.main(["synth", "--format", "fox", "--out", str(tmp_path / "fox"), "--n", "2"]) == 0
    code = cli.main(
        [
            "eval", "--protocol", "fox", "--data", str(tmp_path / "fox" / "en_page_ocr.json"),
            "--model", "tiny", "--device", "cpu", "--modes", "tiny", "--pruners", "rtprune",
            "--retention", "1.0,0.5", "--max-new-tokens", "4", "--out", str(tmp_path / "out"), "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    output = capsys.readouterr().out
    assert "precision" in output and "rtprune" in output and "relative to the unpruned model" in output
    assert (tmp_path / "out" / "relative.png").stat().st_size > 1000
    assert (tmp_path / "out" / "summary.csv").read_text().startswith("mode,pruner,retention")
    bogus = ["eval", "--data", str(tmp_path / "fox"), "--model", "tiny", "--pruners", "bogus"]
    assert cli.main([*bogus, "--protocol", "fox", "--out", str(tmp_path / "x")]) == 2


def test_eval_cli_grid_against_a_running_service_matches_the_in_process_grid(
    tiny_engine, preset_cache, tmp_path, capsys
):
    """``--url``: the same pages and settings sent to a service over HTTP score as they do in this process
    (greedy decoding, one page at a time); the service's key is asked for, and its modes are checked before
    any page is sent."""
    from service import cli
    from service.api.app import create_app
    from service.engine import OCREngine
    from service.loadtest import free_port
    from service.settings import ServiceSettings
    from tests.helpers import live_server

    data = tmp_path / "data"
    write_omnidocbench(data, 2)
    grid = ["--modes", "tiny", "--pruners", "rtprune", "--retention", "1.0,0.5", "--max-new-tokens", "6"]
    args = ["eval", "--protocol", "omnidocbench", "--data", str(data), *grid, "--no-progress"]
    settings = ServiceSettings(model="tiny", log_json=False, warmup=False, api_key="sesame")
    with live_server(create_app(settings, load_engine=lambda: tiny_engine)) as base:
        assert cli.main([*args, "--url", base, "--out", str(tmp_path / "x")]) == 2
        assert "refused the API key" in capsys.readouterr().err
        assert cli.main([*args, "--url", base, "--api-key", "sesame", "--out", str(tmp_path / "remote")]) == 0
    printed = capsys.readouterr()
    assert "relative to the unpruned model" in printed.out and "RANDOM weights" in printed.err
    assert cli.main([*args, "--url", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path / "x")]) == 2
    assert "cannot reach" in capsys.readouterr().err
    v2 = OCREngine.load("tiny-v2", device="cpu", cache_dir=preset_cache)
    with live_server(create_app(ServiceSettings(model="tiny-v2", warmup=False), load_engine=lambda: v2)) as base:
        assert cli.main([*args, "--url", base, "--out", str(tmp_path / "x")]) == 2  # DeepSeek-OCR-2 has no tiny
        assert "serves modes small, gundam, not tiny" in capsys.readouterr().err

    local = Evaluation(
        OmniDocBench(),
        OmniDocBench().load(data),
        settings_grid(["tiny"], ["rtprune"], [1.0, 0.5]),
        engine_runner(tiny_engine, 6),
        cache_key={"in": "process"},
        out=tmp_path / "local",
    ).run(progress=False)
    remote = json.loads((tmp_path / "remote" / "summary.json").read_text())["records"]
    assert len(remote) == len(local) == 3  # none@1.0 beside rtprune at 1.0 and 0.5
    for here, there in zip(local, remote, strict=True):
        assert (there["pruner"], there["retention"]) == (here["pruner"], here["retention"])
        assert there["text_edit"] == pytest.approx(here["text_edit"])
        assert there["visual_tokens_kept"] == here["visual_tokens_kept"]


def test_the_grid_times_warm_settings_in_rotated_rounds_so_the_identity_reads_one(tmp_path):
    """A setting's first call is slow (cold kernels); the grid warms each setting before timing it, so
    rtprune at retention 1.0 — the same work as none — reads 1.0x, and the order rotates by page."""
    from service.evaluation.harness import MIN_TIMED_PAGES

    calls: list[str] = []

    def run(page, setting):
        calls.append(setting.label)
        cold = calls.count(calls[-1]) == 1
        ms = 100.0 if cold else 10.0
        stats = {
            "retention": 1.0,
            "visual_tokens": 10,
            "visual_tokens_kept": 10,
            "prompt_tokens": 12,
            "output_tokens": 1,
            "latency_ms": {"prefill": ms, "vision": ms},
        }
        return {"markdown": str(page.truth), "stats": stats}

    protocol = PROTOCOLS["markdown"]()
    write_pages(tmp_path / "pages", MIN_TIMED_PAGES, seed=0)
    pages = protocol.load(tmp_path / "pages")
    grid = settings_grid(["tiny"], ["rtprune"], [1.0])
    summary = Evaluation(protocol, pages, grid, run, cache_key={"t": 1}, out=tmp_path / "out").run(progress=False)
    assert [r["prefill_speedup"] for r in summary] == [1.0, 1.0]
    assert calls[:2] == [calls[0]] * 2 and calls[2] == calls[3] != calls[0]  # each setting warmed, then timed
    assert calls[4:6] == [calls[2], calls[0]]  # the second page starts with the other setting

    few = Evaluation(protocol, pages[:2], grid, run, cache_key={"t": 2}, out=tmp_path / "few").run(progress=False)
    assert [r["prefill_speedup"] for r in few] == [None, None]  # two pages: no speed column
