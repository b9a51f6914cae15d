"""OmniDocBench's end-to-end protocol: each page's prediction scored its way.

The truth is the benchmark's JSON, read by ``omnidocbench_truth.py``. A page's markdown is cut into
blocks (``blocks.py``), normalised (``normalize.py``) and matched to the truth by the benchmark's
default ``quick_match`` (``quick_match.py``: ignored categories first, split paragraphs merged,
merged paragraphs split, leftovers paired; simple matching when it runs past 30 s, as the evaluator
does), or with ``match="simple"`` its ``simple_match``: one-to-one by the Hungarian assignment on
normalised edit distance. Then, as the benchmark does:

- tables are matched among themselves (on raw HTML); a predicted table left over is broken into
  its cell texts, which join the text pool;
- text and display formulas share one pool, so a formula written as text still matches; a
  formula matched to a text block is scored as text;
- headers, footers, page numbers, footnotes, captions and equation captions take part in the
  matching (so they do not steal a paragraph's match) but are left out of the text score;
- predicted blocks matched to nothing are not charged;
- a group of matched blocks is scored on its lines joined without a separator;
- reading order is the edit distance between the truth's order numbers of the text blocks and
  the same numbers listed in the order the prediction put their matches.

Scores: text and formula edit distance per page (Σ edits / Σ max lengths over the page's
blocks), the table's TEDS and TEDS-S, and reading order. ``summarize`` averages them the
leaderboard's way (page average: TEDS is averaged within each page, then over pages) and beside
it the whole-set ratio (for TEDS, the mean over tables).
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from rapidfuzz.distance import Levenshtein
from scipy.optimize import linear_sum_assignment

from .blocks import FORMULA, HTML_TABLE, LATEX_TABLE, TEXT, Block, split_blocks
from .normalize import clean_text, latex_to_unicode, normalize_formula, normalize_table, normalize_text
from .omnidocbench_truth import IGNORED_IN_TEXT, OmniPage, TruthBlock
from .quick_match import Group, MatchTimeout, distance_matrix, majority_category, quick_match
from .teds import teds

MATCHES = ("quick", "simple")  # the evaluator's quick_match (its default) and simple_match
TIMED_OUT = "simple (quick timed out)"  # a page whose quick matching ran past its deadline, as the evaluator does


@dataclass
class Pair:
    """A truth block and what it was matched to (``pred`` is "" when nothing was)."""

    category: str
    truth: str
    pred: str
    edits: int
    length: int  # max of the two normalised lengths
    attribute: dict[str, Any] = field(default_factory=dict)
    teds: float | None = None
    teds_structure: float | None = None

    @property
    def edit(self) -> float:
        return self.edits / self.length if self.length else 0.0


@dataclass
class PageScore:
    """Every matched pair of a page, by element, and its reading-order distance."""

    name: str
    attributes: dict[str, Any]
    text: list[Pair]
    formula: list[Pair]
    table: list[Pair]
    order: float | None  # None: no text block with an order on this page
    match: str = "quick"  # how the page was matched: quick, simple, or simple after quick timed out


# --- matching -------------------------------------------------------------------------------------


def match_one_to_one(truths: list[str], preds: list[str]) -> dict[int, int]:
    """truth index -> prediction index, minimising the summed normalised edit distance."""
    if not truths or not preds:
        return {}
    rows, cols = linear_sum_assignment(distance_matrix(truths, preds))  # distance / max length
    return {int(r): int(c) for r, c in zip(rows, cols, strict=True)}


def _normalized_pred(block: Block) -> str:
    if block.kind == FORMULA:
        return normalize_formula(block.content)
    if block.kind == TEXT:
        return normalize_text(block.content)
    return block.content


def _normalized_truth(block: TruthBlock) -> str:
    return normalize_formula(block.content) if block.category == "equation_isolated" else normalize_text(block.content)


def _pair(category: str, truth: str, pred: str, norm_truth: str, norm_pred: str, attribute: dict) -> Pair:
    truth_side, pred_side = norm_truth or truth, norm_pred or pred
    return Pair(
        category,
        truth,
        pred,
        Levenshtein.distance(pred_side, truth_side),
        max(len(pred_side), len(truth_side)),
        attribute,
    )


def _cell_texts(table_html: str) -> list[str]:
    """The text of each cell holding plain text, the way a leftover predicted table joins the text pool."""
    from bs4 import BeautifulSoup

    cells = BeautifulSoup(table_html, "html.parser").find_all("td")
    return [re.sub(r"\$\\cdot\$", "", cell.string).strip() for cell in cells if cell.string]


def _score_tables(page: OmniPage, blocks: list[Block]) -> tuple[list[Pair], list[Block]]:
    """Table pairs with TEDS, TEDS-S and edit distance; leftover predicted tables as text blocks."""
    if not page.tables:
        return [], []
    predicted = [b for b in blocks if b.kind == HTML_TABLE and b.content]
    latex = [b for b in blocks if b.kind == LATEX_TABLE]
    if len(latex) > len(predicted):  # LaTeX tables need LaTeXML to become HTML: scored as missing
        predicted = []
    matches = match_one_to_one([t.content for t in page.tables], [b.content for b in predicted])
    pairs = []
    for index, truth in enumerate(page.tables):
        pred = predicted[matches[index]].content if index in matches else ""
        truth_side, pred_side = normalize_table(truth.content) or truth.content, normalize_table(pred) or pred
        pair = _pair("table", truth.content, pred, truth_side, pred_side, truth.attribute)
        pair.teds = teds(pred_side, truth_side)
        pair.teds_structure = teds(pred_side, truth_side, structure_only=True)
        pairs.append(pair)
    used = set(matches.values())
    leftovers = [
        Block(TEXT, text, block.position, inline=False)
        for j, block in enumerate(predicted)
        if j not in used
        for text in _cell_texts(block.content)
    ]
    return pairs, leftovers


def _pool(blocks: list[Block]) -> list[Block]:
    """Text and formula blocks grouped by kind in order of first appearance (simple_match's pool order)."""
    kinds = list(dict.fromkeys(b.kind for b in blocks if b.kind in (TEXT, FORMULA)))
    return [b for kind in kinds for b in blocks if b.kind == kind]


def _page_order(blocks: list[Block]) -> list[Block]:
    """Text and formula blocks in page order, inline formulas last (quick_match's pool order)."""
    return sorted((b for b in blocks if b.kind in (TEXT, FORMULA)), key=lambda b: (b.inline, b.position))


_ARRAY = re.compile(r"\\begin\{array\}\{(?P<spec>[^}]*)\}(?P<body>.*?)\\end\{array\}", re.DOTALL)


def _array_rows(latex: str) -> list[str] | None:
    """The rows of a one-column ``array`` (l, c or r), each as display math; None for anything else.
    quick_match splits such a formula, on either side, into one block a row."""
    found = _ARRAY.search(latex)
    if not found:
        return None
    spec = re.sub(r"[!@]\{[^}]*\}", "", re.sub(r"\s+|\|", "", found["spec"]))
    if spec not in ("l", "c", "r"):
        return None
    return [f"\\[{row.strip()}\\]" for row in re.split(r"\\\\", found["body"]) if row.strip()]


def _split_truth_arrays(blocks: tuple[TruthBlock, ...]) -> list[TruthBlock]:
    split: list[TruthBlock] = []
    for block in blocks:
        rows = _array_rows(block.content) if block.category == "equation_isolated" else None
        if rows is None:
            split.append(block)
            continue
        base = float(block.order or 0)
        split.extend(
            TruthBlock(block.category, row, round(base + k / 10, 1), block.attribute) for k, row in enumerate(rows, 1)
        )  # type: ignore[arg-type]
    return split


def _split_pred_arrays(blocks: list[Block]) -> list[Block]:
    split: list[Block] = []
    for block in blocks:
        rows = _array_rows(block.content) if block.kind == FORMULA else None
        if rows is None:
            split.append(block)
            continue
        body = _ARRAY.search(block.content)
        assert body is not None
        cursor = 0
        for row in rows:
            inner = row[2:-2]
            found = body["body"].find(inner, cursor)
            found = cursor if found < 0 else found
            cursor = found + len(inner)
            position = block.position + body.start("body") + found
            split.append(Block(block.kind, row, position, block.inline))
    return split


def _reading_order(entries: list[tuple[list[float], int | None]]) -> float | None:
    """Edit distance between the truth's order numbers and the same numbers listed in the order the
    prediction put them; ``entries`` are each text group's truth orders and its first predicted block's
    position (None: unmatched)."""
    truth_order = sorted(o for orders, _ in entries for o in orders if o)
    if not truth_order:
        return None
    matched = sorted(((orders, at) for orders, at in entries if at is not None), key=lambda e: e[1])
    predicted = [o for orders, _ in matched for o in orders if o]
    return Levenshtein.distance(truth_order, predicted) / max(len(truth_order), len(predicted))


def _normalized(items, normalize) -> list[tuple[Any, str]]:
    """Each item with its normalised text, items that are empty either way dropped (as the benchmark does)."""
    pairs = [(item, normalize(item)) for item in items if item.content]
    return [(item, norm) for item, norm in pairs if norm]


def _simple_groups(truths: list[str], pool: list[str]) -> list[Group]:
    matches = match_one_to_one(truths, pool)
    return [Group((i,), (matches[i],) if i in matches else ()) for i in range(len(truths))]


def _array_of(lines: list[str]) -> str:
    """Several formula lines as the one ``array`` the evaluator writes for a group of them."""
    rows = " \\\\ ".join("{" + line.strip("$").strip("\n") + "}" for line in lines)
    return f"\\begin{{array}}{{l}} {rows} \\end{{array}}"


@dataclass
class Matched:
    """A page's truth and predicted blocks (each with its normalised text) and how they were grouped."""

    truths: list[tuple[TruthBlock, str]]
    pool: list[tuple[Block, str]]
    groups: list[Group]
    how: str  # quick, simple, or TIMED_OUT


def match_page(
    page: OmniPage, blocks: list[Block], leftovers: list[Block], match: str, deadline_s: float | None
) -> Matched:
    """The evaluator's matching of a page's text and formula blocks (tables are matched apart)."""
    if match == "quick":
        ordered = sorted(_split_pred_arrays(_page_order(blocks)) + leftovers, key=lambda b: (b.inline, b.position))
        pool = _normalized(ordered, _normalized_pred)
        truths = _normalized(_split_truth_arrays(page.blocks), _normalized_truth)
        categories = [t.category for t, _ in truths]
        try:
            groups = quick_match(
                [n for _, n in truths], categories, [n for _, n in pool], set(IGNORED_IN_TEXT), deadline_s
            )
            return Matched(truths, pool, groups, "quick")
        except MatchTimeout:
            match = TIMED_OUT
    pool = _normalized(_pool(blocks) + leftovers, _normalized_pred)
    truths = _normalized(page.blocks, _normalized_truth)
    return Matched(truths, pool, _simple_groups([n for _, n in truths], [n for _, n in pool]), match)


def score_page(page: OmniPage, markdown: str, match: str = "quick", deadline_s: float | None = 30.0) -> PageScore:
    """Score one page's predicted markdown against its truth, matched ``quick`` (the benchmark's
    default) or ``simple``; quick matching past ``deadline_s`` falls back to simple, as the evaluator's
    does."""
    if match not in MATCHES:
        raise ValueError(f"match must be one of {', '.join(MATCHES)}, not {match!r}")
    blocks = split_blocks(markdown)
    table_pairs, leftovers = _score_tables(page, blocks)
    matched = match_page(page, blocks, leftovers, match, deadline_s)
    text, formula, order = _score_groups(matched)
    return PageScore(page.name, page.attributes, text, formula, table_pairs, order, matched.how)


def _score_groups(matched: Matched) -> tuple[list[Pair], list[Pair], float | None]:
    """Text and formula pairs of the matched groups (ignored categories left out; a formula matched to
    text scored as text), and the reading order of the text groups."""
    categories = [t.category for t, _ in matched.truths]
    text, formula, order_entries = [], [], []
    for group in (g for g in matched.groups if g.truths):
        category = majority_category(categories, group, set(IGNORED_IN_TEXT))
        if category in IGNORED_IN_TEXT:
            continue
        members = [matched.truths[i][0] for i in group.truths]
        preds = [matched.pool[j][0] for j in group.preds]
        norm_truth = "".join(matched.truths[i][1] for i in group.truths)
        norm_pred = "".join(matched.pool[j][1] for j in group.preds)
        pred_text = "".join(p.content for p in preds)
        if category == "equation_isolated":
            latex = members[0].content if len(members) == 1 else _array_of([m.content for m in members])
            if preds and preds[0].kind != FORMULA:  # a formula written as text: scored as text
                as_text = latex_to_unicode(latex)
                text.append(_pair(category, as_text, pred_text, clean_text(as_text), norm_pred, {}))
            else:
                formula.append(_pair(category, latex, pred_text, norm_truth, norm_pred, {}))
        else:
            truth_text = "".join(m.content for m in members)
            text.append(_pair(category, truth_text, pred_text, norm_truth, norm_pred, members[0].attribute))
            order_entries.append(([m.order for m in members if m.order], preds[0].position if preds else None))
    return text, formula, _reading_order(order_entries)


# --- aggregation ----------------------------------------------------------------------------------


def _edit_summary(pages: list[list[Pair]]) -> dict[str, float | None]:
    """The leaderboard's page average (Σ/Σ within a page, then the mean), the whole-set ratio, the block mean."""
    per_page = [
        sum(p.edits for p in pairs) / sum(p.length for p in pairs) for pairs in pages if sum(p.length for p in pairs)
    ]
    pairs = [p for page in pages for p in page if p.length]
    total = sum(p.length for p in pairs)
    return {
        "page_avg": statistics.fmean(per_page) if per_page else None,
        "whole": sum(p.edits for p in pairs) / total if total else None,
        "block_avg": statistics.fmean(p.edit for p in pairs) if pairs else None,
        "blocks": len(pairs),
    }


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def page_record(score: PageScore) -> dict[str, Any]:
    """One page's scores, flat (a CSV row)."""

    def page_edit(pairs: list[Pair]) -> float | None:
        total = sum(p.length for p in pairs)
        return sum(p.edits for p in pairs) / total if total else None

    return {
        "page": score.name,
        "text_edit": page_edit(score.text),
        "formula_edit": page_edit(score.formula),
        "table_teds": _mean([p.teds for p in score.table if p.teds is not None]),
        "table_teds_s": _mean([p.teds_structure for p in score.table if p.teds_structure is not None]),
        "table_edit": page_edit(score.table),
        "reading_order_edit": score.order,
        "match": score.match,
    }


def summarize(scores: list[PageScore]) -> dict[str, Any]:
    """The benchmark's headline numbers and their breakdowns, for a list of scored pages."""
    text, formula = _edit_summary([s.text for s in scores]), _edit_summary([s.formula for s in scores])
    tables = [p for s in scores for p in s.table]
    records = [page_record(s) for s in scores]
    by_category: dict[str, list[Pair]] = defaultdict(list)
    by_block_attribute: dict[str, list[float]] = defaultdict(list)
    for pair in (p for s in scores for p in s.text):
        by_category[pair.category].append(pair)
        for key, value in pair.attribute.items():
            by_block_attribute[f"{key}: {value}"].append(pair.edit)
    by_page_attribute: dict[str, list[float]] = defaultdict(list)
    for score, record in zip(scores, records, strict=True):
        edit = record["text_edit"]
        if edit is None:
            continue
        for key, value in score.attributes.items():
            by_page_attribute[f"{key}: {value}"].append(edit)
    order = [s.order for s in scores if s.order is not None]
    return {
        "pages": len(scores),
        "match": ",".join(sorted({s.match for s in scores})) or None,
        "pages_quick_match_timed_out": sum(s.match == TIMED_OUT for s in scores),
        "text_edit": text["page_avg"],
        "text_edit_whole": text["whole"],
        "text_edit_block_avg": text["block_avg"],
        "text_blocks": text["blocks"],
        "formula_edit": formula["page_avg"],
        "formula_edit_whole": formula["whole"],
        "formula_blocks": formula["blocks"],
        "formula_cdm": None,  # CDM renders LaTeX (LaTeX + ImageMagick + node): not computed, see docs/evaluation.md
        # the leaderboard's TEDS: the mean within each page, then over the pages that have tables
        "table_teds": _mean([r["table_teds"] for r in records if r["table_teds"] is not None]),
        "table_teds_s": _mean([r["table_teds_s"] for r in records if r["table_teds_s"] is not None]),
        "table_teds_table_avg": _mean([p.teds for p in tables if p.teds is not None]),
        "table_teds_s_table_avg": _mean([p.teds_structure for p in tables if p.teds_structure is not None]),
        "table_edit": _edit_summary([s.table for s in scores])["page_avg"],
        "tables": len(tables),
        "reading_order_edit": _mean(order),
        "text_edit_by_category": {k: _edit_summary([v])["whole"] for k, v in sorted(by_category.items())},
        "text_edit_by_block_attribute": {k: _mean(v) for k, v in sorted(by_block_attribute.items())},
        "text_edit_by_page_attribute": {k: _mean(v) for k, v in sorted(by_page_attribute.items())},
    }
