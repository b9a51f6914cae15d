"""Synthetic document pages for benchmarks: deterministic, text-like, realistic sizes."""

from __future__ import annotations

from PIL import Image, ImageDraw

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "results",
    "table",
    "figure",
    "method",
    "data",
    "model",
    "token",
    "prefill",
    "retention",
    "accuracy",
    "page",
    "document",
    "markdown",
    "section",
    "analysis",
    "value",
]


def document_page(size: tuple[int, int] = (1100, 800), seed: int = 0) -> Image.Image:
    """A white page with a title, paragraphs of black text and a ruled table."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((width * 0.08, height * 0.04), "Section 1. Results of the analysis", fill="black")
    y, line, state = int(height * 0.1), 0, seed
    while y < height * 0.62:
        words = []
        for _ in range(14):
            state = (state * 1103515245 + 12345) % 2**31
            words.append(WORDS[state % len(WORDS)])
        draw.text((width * 0.08, y), " ".join(words), fill="black")
        y += 14
        line += 1
        if line % 6 == 0:
            y += 10
    top = int(height * 0.66)
    for r in range(6):
        draw.line([(width * 0.08, top + r * 20), (width * 0.92, top + r * 20)], fill="black")
        for c in range(4):
            draw.text((width * (0.1 + 0.2 * c), top + r * 20 + 4), f"{r * 4 + c:.2f}", fill="black")
    return image
