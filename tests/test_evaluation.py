"""Evaluation harness: metrics on known strings, and the whole run on synthetic pages with tiny."""

from __future__ import annotations

import csv
import json

import pytest

from service.evaluation.dataset import load_pages
from service.evaluation.harness import Evaluation, Setting, parse_retentions, settings_grid
from service.evaluation.metrics import (
    edit_counts,
    normalized_edit_distance,
    relative_accuracy,
    set_edit_distance,
)
from service.evaluation.synth import make_page, write_pages


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


def test_relative_accuracy():
    assert relative_accuracy(0.2, 0.2) == 1.0
    assert relative_accuracy(0.3, 0.2) == pytest.approx(0.7 / 0.8)
    assert relative_accuracy(1.0, 1.0) == 1.0


def test_settings_grid_and_retentions():
    grid = settings_grid(["rtprune", "none", "norm"], parse_retentions("1.0,0.7,auto"))
    assert grid[0] == Setting("none", 1.0)
    assert [s.label for s in grid[1:]] == [
        "rtprune@1.0",
        "rtprune@0.7",
        "rtprune@auto",
        "norm@1.0",
        "norm@0.7",
        "norm@auto",
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


def test_omnidocbench_annotations_are_read(tmp_path):
    (tmp_path / "images").mkdir()
    make_page(1)[0].save(tmp_path / "images" / "doc_1.png")
    annotations = [
        {
            "page_info": {"image_path": "doc_1.png"},
            "layout_dets": [
                {"category_type": "text_block", "order": 2, "text": "second"},
                {"category_type": "title", "order": 1, "text": "First"},
                {"category_type": "page_number", "order": 3, "text": "7"},
                {"category_type": "table", "order": 4, "html": "<table></table>"},
                {"category_type": "text_block", "order": 5, "text": "ignored", "ignore": True},
            ],
        }
    ]
    (tmp_path / "OmniDocBench.json").write_text(json.dumps(annotations))
    [page] = load_pages(tmp_path / "OmniDocBench.json")
    assert page.page_id == "doc_1" and page.truth == "First\n\nsecond\n\n<table></table>"


def test_harness_on_tiny_writes_results_and_resumes(tiny_engine, tmp_path):
    write_pages(tmp_path / "data", 2)
    pages = load_pages(tmp_path / "data")
    grid = settings_grid(["rtprune", "norm"], [1.0, 0.7, "auto"])
    out = tmp_path / "out"
    evaluation = Evaluation(tiny_engine, pages, grid, mode="tiny", max_new_tokens=6, out=out)
    summary = evaluation.run(progress=False)
    by_label = {f"{r['pruner']}@{r['retention']}": r for r in summary}
    assert by_label["none@1.0"]["relative_accuracy"] == 1.0
    assert by_label["rtprune@1.0"]["relative_accuracy"] == 1.0  # ratio 1 is the identity
    assert by_label["rtprune@1.0"]["agreement"] == 1.0
    assert by_label["rtprune@0.7"]["mean_retention"] < 1.0
    with (out / "pages.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * len(grid)
    assert {"page", "pruner", "retention", "edit_distance", "agreement", "retention_used", "prefill_ms"} <= set(rows[0])
    saved = json.loads((out / "summary.json").read_text())
    assert saved["random_weights"] is True and len(saved["records"]) == len(grid)
    required = {"pruner", "retention", "edit_distance", "relative_accuracy", "agreement", "mean_retention"}
    for record in saved["records"]:
        assert required <= set(record)

    # resume: a second run reads every result from the cache and does not call the model
    class NoModel:
        name, random_weights, decoder_name = tiny_engine.name, True, tiny_engine.decoder_name

        def run(self, *args, **kwargs):
            raise AssertionError("the cached results should have been reused")

    again = Evaluation(NoModel(), pages, grid, mode="tiny", max_new_tokens=6, out=out).run(progress=False)
    assert again == summary


def test_eval_cli_end_to_end(tmp_path, preset_cache, monkeypatch, capsys):
    from service import cli

    monkeypatch.setattr("service.engine.weights.presets.default_cache_dir", lambda: preset_cache)
    assert cli.main(["synth", "--out", str(tmp_path / "data"), "--n", "2"]) == 0
    code = cli.main(
        [
            "eval",
            "--data",
            str(tmp_path / "data"),
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--mode",
            "tiny",
            "--pruners",
            "rtprune,random",
            "--retention",
            "1.0,auto",
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 0
    output = capsys.readouterr().out
    assert "rel acc" in output and "rtprune" in output
    assert (tmp_path / "out" / "relative_accuracy.png").stat().st_size > 1000
    assert (
        cli.main(
            [
                "eval",
                "--data",
                str(tmp_path / "data"),
                "--model",
                "tiny",
                "--pruners",
                "bogus",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
