"""Synthetic labelled pages (headings, paragraphs, a table) for tests and demos.

    rtprune-ocr synth --out pages --n 20

Rendered with PIL at realistic page sizes; the markdown written beside each image is exactly
the text drawn on it.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WORDS = [
    "model",
    "token",
    "page",
    "table",
    "figure",
    "result",
    "method",
    "value",
    "data",
    "image",
    "text",
    "prune",
    "sinkhorn",
    "norm",
    "layout",
    "document",
    "section",
    "analysis",
    "accuracy",
    "retention",
    "prefill",
    "decode",
    "vision",
    "encoder",
    "language",
]
SIZES = [(850, 1100), (1100, 850), (1240, 1754)]  # letter at 100 dpi, landscape, A4 at 150 dpi


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def make_page(index: int, seed: int = 0) -> tuple[Image.Image, str]:
    """One page and its markdown."""
    rng = random.Random(seed * 1000 + index)
    width, height = rng.choice(SIZES)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(14, width // 60))
    title_font = ImageFont.load_default(size=max(22, width // 35))
    margin, y = width // 12, height // 14
    line_height = int(font.size * 1.5)
    markdown: list[str] = []

    title = f"{rng.choice(WORDS).capitalize()} {rng.choice(WORDS)} report {index + 1}"
    draw.text((margin, y), title, fill="black", font=title_font)
    markdown.append(f"# {title}")
    y += int(title_font.size * 2)
    for section in range(rng.randint(1, 2)):
        heading = f"{section + 1}. {rng.choice(WORDS).capitalize()} {rng.choice(WORDS)}"
        draw.text((margin, y), heading, fill="black", font=title_font)
        markdown.append(f"## {heading}")
        y += int(title_font.size * 1.6)
        for _ in range(rng.randint(1, 2)):
            lines = [_sentence(rng, rng.randint(6, 10)) for _ in range(rng.randint(2, 4))]
            for line in lines:
                draw.text((margin, y), line, fill="black", font=font)
                y += line_height
            markdown.append(" ".join(lines))
            y += line_height // 2
    rows = [["name", "value", "share"]] + [
        [rng.choice(WORDS), str(rng.randint(1, 999)), f"{rng.random():.2f}"] for _ in range(rng.randint(2, 4))
    ]
    col = (width - 2 * margin) // 3
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            draw.rectangle([margin + c * col, y, margin + (c + 1) * col, y + line_height], outline="black")
            draw.text((margin + c * col + 6, y + 4), cell, fill="black", font=font)
        y += line_height
        if r == 0:
            markdown.append("| " + " | ".join(row) + " |\n|" + "---|" * len(row))
        else:
            markdown[-1] += "\n| " + " | ".join(row) + " |"
    return image, "\n\n".join(markdown) + "\n"


def write_pages(out: Path, n: int, seed: int = 0) -> list[Path]:
    """Write ``n`` pages as ``page-000.png`` + ``page-000.md``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(n):
        image, markdown = make_page(index, seed)
        path = out / f"page-{index:03d}.png"
        image.save(path)
        path.with_suffix(".md").write_text(markdown)
        paths.append(path)
    return paths
