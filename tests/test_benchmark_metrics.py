"""The benchmarks' metrics: hand-computed cases for each, and agreement with the benchmarks' own
evaluators on 24 prediction/truth pairs and 20 pages built for the matching rules, under both of
OmniDocBench's matchings (how the reference numbers were made: tests/data/benchmark_pairs/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.evaluation import fox, omnidocbench
from service.evaluation.blocks import FORMULA, HTML_TABLE, TEXT, split_blocks
from service.evaluation.normalize import normalize_formula, normalize_table, normalize_text
from service.evaluation.omnidocbench_truth import load_truth, page_from_json
from service.evaluation.teds import teds

PAIRS = Path(__file__).parent / "data" / "benchmark_pairs"
MATCHING = PAIRS / "matching"  # a page per quick_match rule (tests/benchmark_pairs.py: matching_pairs)


# --- hand-computed cases ----------------------------------------------------------------------------


def test_text_is_compared_on_word_characters_after_inline_math_becomes_unicode():
    assert normalize_text("Hello, world!  (2024)") == "Helloworld2024"
    assert normalize_text("the value $x_{i}^{2}$ grows") == "thevaluex_i2grows"  # pylatexenc: x_i^2; "_" is \\w
    assert normalize_text("$\\alpha$ and 中文") == "αand中文"
    assert normalize_text("a/nb\\tc") == "abc"  # the benchmark drops these literals too


def test_formulas_lose_delimiters_fonts_spacing_and_case():
    assert normalize_formula("$$\\mathbf{X} = \\left( a \\quad b \\right)$$") == "{x}=(ab)"
    assert normalize_formula("\\[ E = mc^2 \\tag{3} \\]") == "e=mc^2"
    assert normalize_formula("\\begin{aligned} a &= b \\end{aligned}") == "a&=b"


def test_tables_keep_structure_and_text_only():
    table = (
        '<table class="x"><thead><tr><th style="a">A&amp;B</th></tr></thead><tbody><tr><td>1</td></tr></tbody></table>'
    )
    assert (
        normalize_table(table)
        == '<html><body><table border="1" ><tr><td>A&B</td></tr><tr><td>1</td></tr></table></body></html>'
    )
    assert normalize_table("no table here") == ""


def test_teds_of_known_trees():
    truth = normalize_table("<table><tr><td>ab</td><td>cd</td></tr></table>")
    assert teds(truth, truth) == 1.0
    # one cell's text "cd" -> "cx": rename cost 1/2 over max(#nodes) = 3 (tr, td, td)
    assert teds(normalize_table("<table><tr><td>ab</td><td>cx</td></tr></table>"), truth) == pytest.approx(1 - 0.5 / 3)
    # a lost colspan changes the structure: the cell's rename costs 1
    spanned = normalize_table('<table><tr><td colspan="2">ab</td></tr></table>')
    plain = normalize_table("<table><tr><td>ab</td></tr></table>")
    assert teds(plain, spanned) == pytest.approx(1 - 1 / 2)
    assert teds(plain, spanned, structure_only=True) == pytest.approx(1 - 1 / 2)
    assert teds("", truth) == 0.0 and teds("<html><body><p>x</p></body></html>", truth) == 0.0


def test_markdown_is_cut_into_the_benchmarks_blocks():
    page = (
        "Title\n\n$$a+b$$\n\nText with $x_1$ inline.\n\n| h1 | h2 |\n|---|---|\n| 1 | 2 |\n\n"
        "<table><tr><td>t</td></tr></table>"
    )
    blocks = split_blocks(page)
    kinds = [(b.kind, b.inline) for b in blocks]
    assert (FORMULA, False) in kinds and (FORMULA, True) in kinds  # display, and the inline one (also left in text)
    assert [b.content for b in blocks if b.kind == TEXT] == ["Title", "Text with $x_1$ inline."]
    tables = [b.content for b in blocks if b.kind == HTML_TABLE]
    assert len(tables) == 2 and '<td colspan="1" rowspan="1">h1</td>' in tables[1 if "t</td>" in tables[0] else 0]
    assert [b.content for b in split_blocks("one\ntwo\nthree")] == ["one", "two", "three"]  # no blank line: cut on \n


def _page(*dets, relations=()):
    return page_from_json(
        {
            "layout_dets": [dict(d, anno_id=i, order=d.get("order", i + 1)) for i, d in enumerate(dets)],
            "page_info": {"image_path": "p.png", "page_attribute": {"layout": "single_column"}},
            "extra": {"relation": list(relations)},
        }
    )


def test_page_edit_is_summed_within_the_page_and_headers_are_matched_but_not_scored():
    page = _page(
        {"category_type": "header", "text": "Running head"},
        {"category_type": "text_block", "text": "abcd"},
        {"category_type": "text_block", "text": "efghij"},
    )
    score = omnidocbench.score_page(page, "Running head\n\nabcx\n\nefghij")
    assert [p.category for p in score.text] == ["text_block", "text_block"]  # the header is not scored
    assert omnidocbench.page_record(score)["text_edit"] == pytest.approx(1 / 10)  # Σ edits / Σ lengths
    missing = omnidocbench.score_page(page, "Running head\n\nefghij")
    assert omnidocbench.page_record(missing)["text_edit"] == pytest.approx(
        4 / 10
    )  # an unmatched block costs its length


def test_reading_order_counts_moves_and_missing_blocks():
    page = _page(*({"category_type": "text_block", "text": t} for t in ("alpha one", "beta two", "gamma three")))
    in_order = omnidocbench.score_page(page, "alpha one\n\nbeta two\n\ngamma three")
    swapped = omnidocbench.score_page(page, "beta two\n\nalpha one\n\ngamma three")
    missing = omnidocbench.score_page(page, "alpha one\n\ngamma three")
    assert in_order.order == 0.0
    assert swapped.order == pytest.approx(2 / 3)  # [1,2,3] vs [2,1,3]: two substitutions
    assert missing.order == pytest.approx(1 / 3)  # [1,2,3] vs [1,3]: one deletion


def test_truncated_blocks_are_joined_and_a_formula_written_as_text_is_scored_as_text():
    page = _page(
        {"category_type": "text_block", "text": "first half "},
        {"category_type": "text_block", "text": "second half"},
        {"category_type": "equation_isolated", "latex": "$$\\alpha+\\beta$$"},
        relations=[{"source_anno_id": 0, "target_anno_id": 1, "relation_type": "truncated"}],
    )
    score = omnidocbench.score_page(page, "first half second half\n\nα+β")
    assert len(score.text) == 2 and score.formula == []
    assert all(p.edits == 0 for p in score.text)


def test_fox_metrics_by_hand():
    # Fox's tool passes (label=truth, answer=model) as (pred, gt): precision divides by the truth's words
    scores = fox.score("the cat sat down", "the cat sat")
    assert scores["precision"] == pytest.approx(3 / 4) and scores["recall"] == pytest.approx(1.0)
    assert scores["f_measure"] == pytest.approx(2 * 0.75 / 1.75)
    assert scores["edit_dist"] == pytest.approx(5 / 16)
    sentence = "one two three four five six"
    assert fox.score(sentence, sentence)["bleu"] == pytest.approx(1.0)
    assert fox.score(sentence, "six five four three two one")["bleu"] == pytest.approx(0.0, abs=1e-9)


def test_fox_meteor_uses_wordnet_synonyms_offline():
    exact = fox.score("the dog runs", "the dog runs")["meteor"]
    synonym = fox.score("the dog runs", "the hound runs")["meteor"]
    unrelated = fox.score("the dog runs", "the car runs")["meteor"]
    assert exact == synonym > unrelated  # "hound" matches "dog" through WordNet (weighted as exact), "car" does not


# --- agreement with the reference evaluators ----------------------------------------------------------


def _our_pages(folder: Path = PAIRS, match: str = "simple") -> tuple[dict[str, dict], dict]:
    pages = load_truth(folder / "OmniDocBench.json")
    predictions = folder / "predictions"
    scores = [omnidocbench.score_page(p, (predictions / f"{Path(p.name).stem}.md").read_text(), match) for p in pages]
    return {s.name: omnidocbench.page_record(s) for s in scores}, omnidocbench.summarize(scores)


ELEMENTS = {
    "text_block": "text_edit",
    "display_formula": "formula_edit",
    "table": "table_edit",
    "reading_order": "reading_order_edit",
}
SETS = {"pairs": PAIRS, "matching": MATCHING}


@pytest.mark.parametrize("match", ["quick", "simple"])
@pytest.mark.parametrize("pages", list(SETS))
@pytest.mark.parametrize("element", list(ELEMENTS))
def test_every_page_agrees_with_omnidocbenchs_evaluator(element, pages, match):
    """Split, merged, reordered, invented and missing paragraphs, headers and page numbers, formulas
    as text and as arrays, tables in HTML, markdown and LaTeX, Chinese, an empty prediction, a long
    page: every page's score under the evaluator's quick_match (its default) and simple_match."""
    ours, _ = _our_pages(SETS[pages], match)
    reference = json.loads((SETS[pages] / f"reference_{match}_match" / f"{element}_per_page_edit.json").read_text())
    assert reference
    for page, value in reference.items():
        assert ours[page][ELEMENTS[element]] == pytest.approx(value, abs=1e-9), page
    assert {p for p, r in ours.items() if r[ELEMENTS[element]] is not None} == set(reference)
    assert {r["match"] for r in ours.values()} == {match}


def test_every_table_agrees_on_teds_and_teds_s():
    ours, _ = _our_pages()
    reference = json.loads((PAIRS / "reference_simple_match" / "table_per_table_TEDS.json").read_text())
    assert len(reference) >= 20
    for key, value in reference.items():
        page = key.rsplit("_", 1)[0]  # "<image name>_<table index>"; one table per page here
        assert ours[page]["table_teds"] == pytest.approx(value["TEDS"], abs=1e-3), key
        assert ours[page]["table_teds_s"] == pytest.approx(value["TEDS_structure_only"], abs=1e-3), key


@pytest.mark.parametrize("match", ["quick", "simple"])
@pytest.mark.parametrize("pages", list(SETS))
def test_the_headline_numbers_agree(pages, match):
    _, summary = _our_pages(SETS[pages], match)
    reference = json.loads((SETS[pages] / f"reference_{match}_match" / "metric_result.json").read_text())
    text = reference["text_block"]["all"]["Edit_dist"]
    assert summary["text_edit"] == pytest.approx(text["ALL_page_avg"], abs=1e-9)
    assert summary["text_edit_whole"] == pytest.approx(text["edit_whole"], abs=1e-9)
    assert summary["formula_edit"] == pytest.approx(
        reference["display_formula"]["all"]["Edit_dist"]["ALL_page_avg"], abs=1e-9
    )
    tables = reference["table"]
    assert summary["table_teds"] == pytest.approx(tables["page"]["TEDS"]["ALL"], abs=1e-3)  # the leaderboard's
    assert summary["table_teds_s"] == pytest.approx(tables["page"]["TEDS_structure_only"]["ALL"], abs=1e-3)
    assert summary["table_teds_table_avg"] == pytest.approx(tables["all"]["TEDS"]["all"], abs=1e-3)
    assert summary["reading_order_edit"] == pytest.approx(
        reference["reading_order"]["all"]["Edit_dist"]["ALL_page_avg"], abs=1e-9
    )


def test_quick_match_forgives_what_simple_match_charges():
    """The leaderboard's matching re-joins a paragraph split in three and splits three merged ones."""
    quick, _ = _our_pages(MATCHING, "quick")
    simple, _ = _our_pages(MATCHING, "simple")
    for page in ("matching_split_in_three.png", "matching_merged_three.png", "matching_chinese.png"):
        assert quick[page]["text_edit"] == 0 < simple[page]["text_edit"], page


def test_a_page_past_quick_matchings_deadline_is_matched_the_simple_way_and_says_so():
    page = load_truth(MATCHING / "OmniDocBench.json")[0]
    markdown = (MATCHING / "predictions" / f"{Path(page.name).stem}.md").read_text()
    late = omnidocbench.score_page(page, markdown, "quick", deadline_s=0.0)
    simple = omnidocbench.score_page(page, markdown, "simple")
    assert late.match == "simple (quick timed out)"
    assert omnidocbench.page_record(late) | {"match": None} == omnidocbench.page_record(simple) | {"match": None}
    assert omnidocbench.summarize([late])["pages_quick_match_timed_out"] == 1
    with pytest.raises(ValueError, match="quick, simple"):
        omnidocbench.score_page(page, markdown, "fuzzy")


def test_fox_agrees_with_fox_tool_on_every_pair():
    pairs = json.loads((PAIRS / "fox_pairs.json").read_text())
    reference = json.loads((PAIRS / "reference_fox.json").read_text())
    assert len(pairs) >= 20
    for pair in pairs:
        ours = fox.score(pair["label"], pair["answer"])
        for metric in fox.METRICS:
            assert ours[metric] == pytest.approx(reference[pair["image"]][metric] or 0.0, abs=1e-6), (
                pair["image"],
                metric,
            )


def long_page(words: int, seed: int, chinese: bool = False) -> str:
    """A real-length page: Fox's pages run 600-1,300 tokens, mostly past nltk's 2,000-character limit."""
    import random

    rng = random.Random(seed)
    if chinese:
        return "".join(
            rng.choice("的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生")
            for _ in range(words)
        )
    vocabulary = ["model", "token", "page", "vision", "encoder", "layout", "table", "formula", "reading", "order"]
    return " ".join(rng.choice(vocabulary) for _ in range(words))


@pytest.mark.parametrize("chinese", [False, True], ids=["english", "chinese"])
def test_fox_scores_real_length_pages_with_the_edit_distance_nltk_computes(chinese):
    import nltk

    truth = long_page(900 if not chinese else 4200, seed=1, chinese=chinese)
    assert len(truth) >= 4000
    changed = list(truth)
    for position in range(100, len(changed), 700):  # substitutions far apart: the distance is their count
        changed[position] = "#"
    prediction = "".join(changed)[:-50]  # and the last 50 characters missing
    substitutions = len(range(100, len(truth) - 50, 700))
    scores = fox.score(truth, prediction)
    assert scores["edit_dist"] == pytest.approx((substitutions + 50) / len(truth))
    assert all(0.0 <= scores[m] <= 1.0 for m in fox.METRICS) and scores["bleu"] > 0.5
    # on a prefix short enough for nltk (what Fox's tool calls), the two distances are the same number
    short_truth, short_prediction = truth[:1500], prediction[:1400]
    assert fox.score(short_truth, short_prediction)["edit_dist"] == pytest.approx(
        nltk.edit_distance(short_truth, short_prediction) / 1500
    )


def test_fox_scores_an_empty_prediction_zero_where_its_tool_would_crash():
    scores = fox.score("the cat sat down", "")
    assert scores["edit_dist"] == 1.0 and scores["precision"] == scores["recall"] == scores["f_measure"] == 0.0
    assert fox.summarize([scores, fox.score("a b", "a b")])["pages"] == 2


def test_teds_is_averaged_within_each_page_then_over_pages_as_the_leaderboard_does():
    def table(teds: float) -> omnidocbench.Pair:
        return omnidocbench.Pair("table", "t", "p", 0, 1, teds=teds, teds_structure=teds)

    pages = [
        omnidocbench.PageScore("a.png", {}, [], [], [table(1.0), table(0.5)], None),
        omnidocbench.PageScore("b.png", {}, [], [], [table(0.0)], None),
        omnidocbench.PageScore("c.png", {}, [], [], [], None),  # no table: not in the average
    ]
    summary = omnidocbench.summarize(pages)
    assert summary["table_teds"] == summary["table_teds_s"] == pytest.approx((0.75 + 0.0) / 2)
    assert summary["table_teds_table_avg"] == pytest.approx(0.5)
