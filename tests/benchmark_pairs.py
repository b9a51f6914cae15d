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


# --- pages built to exercise each rule of quick_match ----------------------------------------------

WORDS = (
    "model",
    "page",
    "token",
    "vision",
    "encoder",
    "prefill",
    "decode",
    "retention",
    "table",
    "figure",
    "layout",
    "reading",
    "order",
    "text",
    "block",
    "formula",
    "header",
    "footer",
    "caption",
    "number",
    "value",
    "grows",
    "method",
    "result",
    "column",
    "paragraph",
    "section",
    "data",
    "image",
)
CJK = (
    "文档理解是计算机视觉中的重要任务模型读取页面图像并输出结构化文本表格公式"
    "与阅读顺序都需要被正确识别压缩视觉令牌可以降低推理成本"
)


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def _paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng, rng.randint(6, 14)) for _ in range(sentences))


def _cjk_paragraph(rng: random.Random, characters: int) -> str:
    return "".join(rng.choice(CJK) for _ in range(characters)) + "。"


def _matching_page(name: str, blocks: list[tuple[str, str]], language: str = "english") -> dict:
    """A page entry of OmniDocBench's JSON from (category, content) in reading order."""
    dets = []
    for order, (category, content) in enumerate(blocks, 1):
        det = {
            "category_type": category,
            "poly": [0, 0, 10, 0, 10, 10, 0, 10],
            "ignore": False,
            "order": order,
            "anno_id": order,
            "attribute": {"text_language": f"text_{language}"},
        }
        key = {"table": "html", "equation_isolated": "latex"}.get(category, "text")
        det[key] = content
        if category == "table":  # the benchmark's tables carry both forms
            det["latex"] = LATEX_TABLE
        dets.append(det)
    info = {
        "page_no": 0,
        "height": 1000,
        "width": 800,
        "image_path": f"matching_{name}.png",
        "page_attribute": {"data_source": "academic_literature", "language": language, "layout": "single_column"},
    }
    return {"layout_dets": dets, "page_info": info, "extra": {"relation": []}}


TABLE = (
    "<table><tr><td>Mode</td><td>Tokens</td></tr><tr><td>Tiny</td><td>64</td></tr>"
    "<tr><td>Base</td><td>256</td></tr></table>"
)
LATEX_TABLE = "\\begin{tabular}{ll}\nMode & Tokens \\\\\nTiny & 64 \\\\\nBase & 256 \\\\\n\\end{tabular}"


def matching_pairs() -> list[tuple[dict, str]]:
    """(truth page, predicted markdown) for each matching rule, named after it."""
    rng = random.Random(77)
    p = [_paragraph(rng, rng.randint(3, 6)) for _ in range(8)]
    header, footer, number, caption = "Journal of Tokens 12", "Preprint under review", "7", "Table 1: Tokens per mode."
    chars = lambda text, rate: _typos(text, rng, rate)  # noqa: E731
    pairs = []

    def page(name: str, truth: list[tuple[str, str]], predicted: list[str], language: str = "english") -> None:
        pairs.append((_matching_page(name, truth, language), "\n\n".join(x for x in predicted if x) + "\n"))

    body = [("text_block", t) for t in p[:4]]
    thirds = [p[0][: len(p[0]) // 3], p[0][len(p[0]) // 3 : 2 * len(p[0]) // 3], p[0][2 * len(p[0]) // 3 :]]
    page("split_in_three", [("header", header), *body], [header, *thirds, *p[1:4]])
    page("merged_three", [("header", header), *body], [header, p[0] + " " + p[1] + " " + p[2], p[3]])
    page(
        "split_and_merged",
        [("header", header), ("title", "Token pruning"), *body],
        [
            header,
            "# Token pruning",
            p[0][: len(p[0]) // 2],
            p[0][len(p[0]) // 2 :] + " " + p[1],
            chars(p[2], 0.05),
            p[3],
        ],
    )
    page(
        "headers_footers_numbers",
        [
            ("header", header),
            ("title", "Results"),
            *body[:3],
            ("figure_caption", "Figure 2: Pages per second."),
            ("page_footnote", "1 Measured on one GPU."),
            ("footer", footer),
            ("page_number", number),
        ],
        [
            chars(header, 0.1),
            "# Results",
            *p[:3],
            "Figure 2: Pages per second.",
            number,
            "Journal of Tokens 12 " + p[4][:40],
        ],
    )
    page(
        "header_like_paragraph",
        [("header", "Token pruning methods"), ("text_block", "Token pruning methods"), *body[:2]],
        ["Token pruning methods", *p[:2]],
    )
    page(
        "leftover_rewritten",
        [("header", header), *body],
        [header, p[0], "Completely different words fill this block instead of the paragraph.", p[2], p[3]],
    )
    page("invented_and_missing", [("header", header), *body], [header, p[0], p[2], _paragraph(rng, 3), p[3]])
    page(
        "formula_as_text",
        [
            ("header", header),
            ("text_block", p[0]),
            ("equation_isolated", "$$E=\\sum_{i} w_{i} x_{i}^{2}$$"),
            ("text_block", p[1]),
        ],
        [header, p[0], "E = Σ w i x i 2", p[1]],
    )
    page(
        "equation_array_split",
        [
            ("header", header),
            ("text_block", p[0]),
            ("equation_isolated", "$$\\begin{array}{l} a=b+c \\\\ d=e f \\end{array}$$"),
            ("text_block", p[1]),
        ],
        [header, p[0], "$$a=b+c$$", "$$d=ef$$", p[1]],
    )
    page(
        "equations_joined",
        [
            ("header", header),
            ("text_block", p[0]),
            ("equation_isolated", "$$a=b+c$$"),
            ("equation_isolated", "$$d=e f$$"),
            ("text_block", p[1]),
        ],
        [header, p[0], "$$\\begin{array}{l} a=b+c \\\\ d=ef \\end{array}$$", p[1]],
    )
    page(
        "inline_math",
        [
            ("header", header),
            ("text_block", "The value $x_{i}^{2}$ grows with $\\alpha$ here. " + p[0]),
            ("text_block", p[1]),
        ],
        [header, "The value $x_i^2$ grows with $\\alpha$ here. " + p[0], p[1]],
    )
    page(
        "table_html",
        [("header", header), ("text_block", p[0]), ("table_caption", caption), ("table", TABLE), ("text_block", p[1])],
        [header, p[0], caption, TABLE.replace("64", "65"), p[1]],
    )
    page(
        "table_markdown",
        [("header", header), ("text_block", p[0]), ("table", TABLE), ("text_block", p[1])],
        [header, p[0], "| Mode | Tokens |\n|---|---|\n| Tiny | 64 |\n| Base | 256 |", p[1]],
    )
    page(
        "table_latex",
        [("header", header), ("text_block", p[0]), ("table", TABLE), ("text_block", p[1])],
        [header, p[0], LATEX_TABLE, p[1]],
    )
    page(
        "table_not_in_truth",
        [("header", header), ("text_block", p[0]), ("table", TABLE), ("text_block", p[1])],
        [header, p[0], TABLE, "<table><tr><td>" + p[1][:30] + "</td><td>ghost</td></tr></table>", p[1][30:]],
    )
    c = [_cjk_paragraph(rng, rng.randint(60, 120)) for _ in range(4)]
    page(
        "chinese",
        [("header", "第十二卷"), *[("text_block", t) for t in c]],
        ["第十二卷", c[0][:40], c[0][40:], chars(c[1], 0.0), c[2] + c[3]],
        language="simplified_chinese",
    )
    page("empty_prediction", [("header", header), *body], [])
    page("only_ignored_truth", [("header", header), ("page_number", number)], [header, p[0]])
    long = [_paragraph(rng, rng.randint(4, 9)) for _ in range(36)]
    predicted = [header]
    for k, text in enumerate(long):
        if k % 9 == 2:
            predicted += [text[: len(text) // 2], text[len(text) // 2 :]]
        elif k % 9 == 5 and k + 1 < len(long):
            predicted.append(text + " " + long[k + 1])
        elif k % 9 == 6:
            continue
        else:
            predicted.append(chars(text, 0.03))
    page("long_page", [("header", header), *[("text_block", t) for t in long]], predicted)
    page(
        "columns_swapped_and_split",
        [("header", header), *body],
        [header, p[2], p[3][: len(p[3]) // 2], p[3][len(p[3]) // 2 :], p[0], p[1]],
    )
    return pairs


def write_matching_pairs(out: Path) -> None:
    """``out/OmniDocBench.json`` and ``out/predictions/`` of :func:`matching_pairs`."""
    predictions = out / "predictions"
    predictions.mkdir(parents=True, exist_ok=True)
    pairs = matching_pairs()
    for truth, markdown in pairs:
        (predictions / f"{Path(truth['page_info']['image_path']).stem}.md").write_text(markdown, encoding="utf-8")
    truths = [truth for truth, _ in pairs]
    (out / "OmniDocBench.json").write_text(json.dumps(truths, indent=1, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    write_pairs(Path(sys.argv[1]))
    write_matching_pairs(Path(sys.argv[1]) / "matching")
