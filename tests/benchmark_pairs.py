"""Prediction/truth pairs for checking our metrics against the benchmarks' own evaluators.

``python -m tests.benchmark_pairs tests/data/benchmark_pairs`` writes 24 synthetic OmniDocBench
pages (``OmniDocBench.json``), one predicted markdown per page (``predictions/``), each a
different way a model goes wrong (typos, columns read in the wrong order, a table as a pipe
table or with lost spans, a formula written as text, split/merged/missing/invented
paragraphs, nothing at all...), and 24 Fox pairs (``fox_pairs.json`` in the layout Fox's tool
reads). The files are committed with the reference evaluators' numbers on them
(``reference_*.json``; how they were produced: ``tests/data/benchmark_pairs/README.md``), so
changing this generator means producing those numbers again.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from service.evaluation.synth_benchmarks import fox_text, omnidocbench_page, truth_markdown

PAGES = 24


def _typos(text: str, rng: random.Random, rate: float) -> str:
    chars = list(text)
    for i in range(len(chars)):
        if chars[i].isalnum() and rng.random() < rate:
            chars[i] = rng.choice("abcdefghijklmnopqrstuvwxyz0123456789")
    return "".join(chars)


def _blocks(page: dict) -> dict[str, list[str]]:
    by_category: dict[str, list[str]] = {}
    truncated = {r["target_anno_id"] for r in page["extra"]["relation"]}
    for det in sorted(page["layout_dets"], key=lambda d: d["order"]):
        text = det.get("html") or det.get("latex") or det.get("text", "")
        if det["anno_id"] in truncated:
            by_category["text_block"][-1] += " " + text
            continue
        by_category.setdefault(det["category_type"], []).append(text)
    return by_category


def _compose(b: dict[str, list[str]], paragraphs: list[str] | None = None, formula: str | None = None,
             table: str | None = None, footer: bool = True) -> str:  # fmt: skip
    """Header first (always: see the README on the reference's first-block quirk), then the body."""
    paragraphs = b["text_block"][:-1] if paragraphs is None else paragraphs
    parts = [b["header"][0], "# " + b["title"][0], *paragraphs]
    parts.append(b["equation_isolated"][0] if formula is None else formula)
    parts += [b["table_caption"][0], b["table"][0] if table is None else table, b["text_block"][-1]]
    if footer:
        parts += [b["footer"][0], b["page_number"][0]]
    return "\n\n".join(p for p in parts if p) + "\n"


def _pipe(table_html: str) -> str:
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table_html)]
    width = max(len(r) for r in rows)
    lines = ["| " + " | ".join(r + [""] * (width - len(r))) + " |" for r in rows]
    return "\n".join([lines[0], "|" + "---|" * width, *lines[1:]])


def prediction(index: int, page: dict) -> str:
    """The page's predicted markdown: variant ``index`` of the ways a model goes wrong."""
    rng = random.Random(1000 + index)
    b = _blocks(page)
    body = b["text_block"][:-1]
    variants = {
        0: lambda: truth_markdown(page),
        1: lambda: _compose(b, [_typos(p, rng, 0.05) for p in body]),
        2: lambda: _compose(b, body[len(body) // 2 :] + body[: len(body) // 2]),  # right column read first
        3: lambda: _compose(b, footer=False),
        4: lambda: _compose(b, table=_pipe(b["table"][0])),
        5: lambda: _compose(b, table=re.sub(r">(\d+)<", lambda m: f">{int(m.group(1)) + 1}<", b["table"][0], count=2)),
        6: lambda: _compose(b, table=re.sub(r' (row|col)span="2"', "", b["table"][0])),
        7: lambda: _compose(b, formula=_typos(b["equation_isolated"][0], rng, 0.15)),
        8: lambda: _compose(b, formula="E equals the sum of w times x squared"),
        9: lambda: _compose(b, [body[0][: len(body[0]) // 2], body[0][len(body[0]) // 2 :], *body[1:]]),
        10: lambda: _compose(b, [body[0] + " " + body[1], *body[2:]]),
        11: lambda: _compose(b, body[1:]),
        12: lambda: _compose(b, [*body, "An invented paragraph about tokens that the page never had."]),
        13: lambda: _compose(b).replace("\n\n", "\n"),
        14: lambda: _compose(b, [p.replace("$\\alpha_{t}$", "αt").replace("$x_{i}^{2}$", "xi2") for p in body]),
        15: lambda: _compose(
            b, table=b["table"][0].replace("<tr>", "<thead><tr>", 1).replace("</tr>", "</tr></thead>", 1)
        ),
        16: lambda: _compose(b, table=""),
        17: lambda: _compose(b, table=b["table"][0] + "\n\n<table><tr><td>ghost</td><td>cell</td></tr></table>"),
        18: lambda: "",
        19: lambda: _compose(b).replace("# ", "## "),
        20: lambda: _compose(b, formula="\\[" + b["equation_isolated"][0].strip("$") + "\\]"),
        21: lambda: _compose(b, footer=False) + _typos(b["footer"][0], rng, 0.3) + "\n",
        22: lambda: _compose(b, [_typos(p, rng, 0.02) for p in reversed(body)]),
        23: lambda: _compose(
            b, [_typos(p, rng, 0.25) for p in body], formula=_typos(b["equation_isolated"][0], rng, 0.3)
        ),
    }
    return variants[index]()


def fox_prediction(index: int, truth: str) -> str:
    rng = random.Random(2000 + index)
    words = truth.split()
    kind = index % 6
    if kind == 0:
        return truth
    if kind == 1:
        return _typos(truth, rng, 0.04)
    if kind == 2:
        return " ".join(words[: len(words) * 2 // 3])  # stops early
    if kind == 3:
        return " ".join(words + words[: len(words) // 3])  # repeats itself
    if kind == 4:
        return " ".join(rng.sample(words, len(words)))  # every word, shuffled
    return _typos(" ".join(w for w in words if rng.random() > 0.2), rng, 0.02)


def write_pairs(out: Path) -> None:
    predictions = out / "predictions"
    predictions.mkdir(parents=True, exist_ok=True)
    pages = [omnidocbench_page(i, seed=7) for i in range(PAGES)]
    for index, page in enumerate(pages):
        stem = Path(page["page_info"]["image_path"]).stem
        (predictions / f"{stem}.md").write_text(prediction(index, page), encoding="utf-8")
    (out / "OmniDocBench.json").write_text(json.dumps(pages, indent=1, ensure_ascii=False), encoding="utf-8")
    fox = []
    for index in range(PAGES):
        truth = fox_text(index, seed=7)
        fox.append({"image": f"en_{index + 1}.png", "label": truth, "answer": fox_prediction(index, truth)})
    (out / "fox_pairs.json").write_text(json.dumps(fox, indent=1, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    write_pairs(Path(sys.argv[1]))
