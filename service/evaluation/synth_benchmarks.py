"""Synthetic labelled pages in the benchmarks' own formats, so the loaders meet the real schemas.

    rtprune-ocr synth --format omnidocbench --out odb --n 20   # OmniDocBench.json + images/
    rtprune-ocr synth --format fox --out fox --n 20            # en_page_ocr.json + en_pdf_png/

A page has a running header, a title, two columns of paragraphs (read left column first; on
some pages a paragraph runs on from the left column into the right, a ``truncated``
relation), inline and display formulas, a captioned HTML table with row and column spans,
a footer and a page number, each block with its category, reading order, polygon and
attributes as the benchmark writes them. The image draws the same blocks. The datasets
themselves are research-only and never shipped; this is what the tests and docs/evaluation.md's
synthetic run use.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .synth import WORDS

PAGE_SIZE = (1190, 1684)  # A4 at 144 dpi, as many OmniDocBench pages
FORMULAS = [
    r"E=\sum_{i=1}^{n} w_{i} x_{i}^{2}",
    r"\frac{a+b}{c}=\alpha \cdot \beta",
    r"P(y \mid x)=\frac{e^{s_{y}}}{\sum_{k} e^{s_{k}}}",
    r"\| v \|_{2}=\sqrt{\sum_{j} v_{j}^{2}}",
]
INLINE = [r"$x_{i}^{2}$", r"$\alpha_{t}$", r"$k \le n$"]
SOURCES = ["academic_literature", "book", "newspaper", "research_report"]


@dataclass(frozen=True)
class SynthBlock:
    category: str
    text: str  # text, LaTeX or HTML, by category
    box: tuple[int, int, int, int]


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def _paragraph(rng: random.Random, with_math: bool) -> str:
    sentences = [_sentence(rng, rng.randint(6, 10)) for _ in range(rng.randint(2, 3))]
    if with_math:
        sentences.insert(1, f"The value {rng.choice(INLINE)} grows.")
    return " ".join(sentences)


def span_table(rng: random.Random) -> str:
    """An HTML table whose first column spans two rows and whose header spans two columns."""
    values = [[str(rng.randint(1, 999)) for _ in range(2)] for _ in range(4)]
    groups = [rng.choice(WORDS) for _ in range(2)]
    rows = [
        f'<tr><td rowspan="2">group</td><td colspan="2">{rng.choice(WORDS)}</td></tr>',
        "<tr><td>low</td><td>high</td></tr>",
    ]
    for g, group in enumerate(groups):
        first, second = values[2 * g], values[2 * g + 1]
        rows.append(f'<tr><td rowspan="2">{group}</td><td>{first[0]}</td><td>{first[1]}</td></tr>')
        rows.append(f"<tr><td>{second[0]}</td><td>{second[1]}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def make_layout(index: int, seed: int = 0) -> tuple[list[SynthBlock], set[int]]:
    """A page's blocks in reading order, and the indices of blocks continuing the one before (truncated)."""
    rng = random.Random(seed * 7919 + index)
    width, height = PAGE_SIZE
    margin, gutter, column = 90, 40, (width - 2 * 90 - 40) // 2
    blocks = [
        SynthBlock(
            "header", f"Synthetic {rng.choice(WORDS)} review, volume {index % 9 + 1}", (margin, 40, width - margin, 70)
        ),
        SynthBlock(
            "title",
            f"{rng.choice(WORDS).capitalize()} {rng.choice(WORDS)} and {rng.choice(WORDS)}",
            (margin, 100, width - margin, 150),
        ),
    ]
    truncated = set()
    for col in range(2):
        x0, y = margin + col * (column + gutter), 180
        for _ in range(2):
            blocks.append(SynthBlock("text_block", _paragraph(rng, rng.random() < 0.4), (x0, y, x0 + column, y + 220)))
            y += 240
    if index % 3 == 2:  # the left column's last paragraph runs on at the top of the right column
        truncated.add(4)
    blocks.append(SynthBlock("equation_isolated", rng.choice(FORMULAS), (margin + 200, 680, width - margin - 200, 740)))
    blocks.append(
        SynthBlock("table_caption", f"Table {index + 1}: {_sentence(rng, 5)}", (margin, 770, width - margin, 800))
    )
    blocks.append(SynthBlock("table", span_table(rng), (margin, 810, width - margin, 1110)))
    blocks.append(SynthBlock("text_block", _paragraph(rng, False), (margin, 1140, width - margin, 1320)))
    blocks.append(
        SynthBlock("footer", f"Synthetic press {2020 + index % 6}", (margin, height - 90, width - margin, height - 60))
    )
    blocks.append(
        SynthBlock("page_number", str(index + 1), (width // 2 - 20, height - 50, width // 2 + 20, height - 20))
    )
    return blocks, truncated


def _table_cells(table_html: str) -> list[list[str]]:
    import re

    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table_html)]


def render(blocks: list[SynthBlock]) -> Image.Image:
    """The page image: each block's text drawn inside its box (tables as a grid of their cells)."""
    image = Image.new("RGB", PAGE_SIZE, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=18)
    for block in blocks:
        x0, y0, x1, y1 = block.box
        if block.category == "table":
            rows = _table_cells(block.text)
            height = (y1 - y0) // max(1, len(rows))
            for r, cells in enumerate(rows):
                width = (x1 - x0) // 3
                for c, cell in enumerate(cells):
                    box = (x0 + c * width, y0 + r * height, x0 + (c + 1) * width, y0 + (r + 1) * height)
                    draw.rectangle(box, outline="black")
                    draw.text((box[0] + 6, box[1] + 6), cell, fill="black", font=font)
            continue
        words, line, y = block.text.split(), "", y0
        for word in words:
            if draw.textlength(f"{line} {word}", font=font) > x1 - x0 and line:
                draw.text((x0, y), line, fill="black", font=font)
                line, y = word, y + 24
            else:
                line = f"{line} {word}".strip()
        draw.text((x0, y), line, fill="black", font=font)
    return image


def omnidocbench_page(index: int, seed: int = 0) -> dict:
    """One page entry of OmniDocBench's JSON."""
    blocks, truncated = make_layout(index, seed)
    dets = []
    for anno_id, block in enumerate(blocks):
        x0, y0, x1, y1 = block.box
        det = {
            "category_type": block.category,
            "poly": [x0, y0, x1, y0, x1, y1, x0, y1],
            "ignore": False,
            "order": anno_id + 1,
            "anno_id": anno_id,
        }
        if block.category == "table":
            det.update(
                html=block.text, attribute={"table_layout": "horizontal", "with_span": True, "line": "full_line"}
            )
        elif block.category == "equation_isolated":
            det.update(latex=f"$${block.text}$$")
        else:
            det["text"] = block.text
            det["attribute"] = {"text_language": "text_english", "text_background": "white", "text_rotate": "normal"}
        dets.append(det)
    relations = [
        {"source_anno_id": i - 1, "target_anno_id": i, "relation_type": "truncated"} for i in sorted(truncated)
    ]
    return {
        "layout_dets": dets,
        "page_info": {
            "page_no": index,
            "height": PAGE_SIZE[1],
            "width": PAGE_SIZE[0],
            "image_path": f"synthetic_{seed}_{index:04d}.png",
            "page_attribute": {
                "data_source": SOURCES[index % len(SOURCES)],
                "language": "english",
                "layout": "double_column",
            },
        },
        "extra": {"relation": relations},
    }


def truth_markdown(page: dict) -> str:
    """The page as a perfect model would write it in markdown (blocks in reading order)."""
    parts, dets = [], sorted(page["layout_dets"], key=lambda d: d["order"])
    truncated = {r["target_anno_id"] for r in page["extra"]["relation"]}
    for det in dets:
        category = det["category_type"]
        text = det.get("html") or det.get("latex") or det.get("text", "")
        if category == "title":
            text = f"# {text}"
        if det["anno_id"] in truncated:
            parts[-1] += " " + text
        else:
            parts.append(text)
    return "\n\n".join(parts) + "\n"


def write_omnidocbench(out: Path, n: int, seed: int = 0, with_images: bool = True) -> Path:
    """``out/OmniDocBench.json`` and ``out/images/``, as the benchmark is laid out on download."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    pages = [omnidocbench_page(i, seed) for i in range(n)]
    for index, page in enumerate(pages):
        if with_images:
            blocks, _ = make_layout(index, seed)
            render(blocks).save(out / "images" / page["page_info"]["image_path"])
    path = out / "OmniDocBench.json"
    path.write_text(json.dumps(pages, indent=1, ensure_ascii=False), encoding="utf-8")
    return path


def fox_text(index: int, seed: int = 0) -> str:
    """The plain text of a page, as Fox's page-OCR truth holds it (no markup)."""
    blocks, _ = make_layout(index, seed)
    return "\n".join(b.text for b in blocks if b.category in ("title", "text_block", "table_caption"))


def write_fox(out: Path, n: int, seed: int = 0) -> Path:
    """``out/en_page_ocr.json`` and ``out/en_pdf_png/``, Fox's page-OCR layout."""
    images = out / "en_pdf_png"
    images.mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(n):
        blocks, _ = make_layout(index, seed)
        kept = [b for b in blocks if b.category in ("title", "text_block", "table_caption")]
        name = f"en_{index + 1}.png"
        render(kept).save(images / name)
        text = fox_text(index, seed)
        entries.append(
            {
                "image": name,
                "len": len(text.split()),
                "conversations": [
                    {"from": "human", "value": "<image>\nOCR this image: "},
                    {"from": "gpt", "value": text},
                ],
            }
        )
    path = out / "en_page_ocr.json"
    path.write_text(json.dumps(entries, indent=1, ensure_ascii=False), encoding="utf-8")
    return path
