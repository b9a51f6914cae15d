"""Model output -> raw text, clean markdown and layout boxes in pixels of the original page.

Document tasks interleave grounding tags with the content:
``<|ref|>LABEL<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>\\nCONTENT``, with coordinates
in 0-999 bins of the page. Markdown drops the tags (as the official eval script does);
boxes keep them, mapped with ``int(x / 999 * width)`` like the official drawing code.
"""

from __future__ import annotations

import ast
import re

from pydantic import BaseModel, Field

GROUNDING = re.compile(r"<\|ref\|>(.*?)<\|/ref\|><\|det\|>(.*?)<\|/det\|>", re.DOTALL)
EOS_TEXT = "<｜end▁of▁sentence｜>"
_LATEX_FIXES = {"\\coloneqq": ":=", "\\eqqcolon": "=:"}


class Box(BaseModel):
    label: str
    box: list[int] = Field(min_length=4, max_length=4, description="[x1, y1, x2, y2] in pixels of the uploaded page")


def decode_text(tokenizer, tokens: list[int]) -> str:
    """Raw model output, special tokens kept (they carry the grounding), trailing eos removed."""
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    return text.removesuffix(EOS_TEXT).strip()


def parse_boxes(text: str, size: tuple[int, int]) -> list[Box]:
    """Every well-formed box of every grounding tag, in pixels; malformed ones are skipped."""
    width, height = size
    boxes = []
    for label, coordinates in GROUNDING.findall(text):
        try:
            parsed = ast.literal_eval(coordinates.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(parsed, (list, tuple)) and len(parsed) == 4 and all(isinstance(v, (int, float)) for v in parsed):
            parsed = [parsed]
        if not isinstance(parsed, (list, tuple)):
            continue
        for box in parsed:
            if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                continue
            x1, y1, x2, y2 = (min(max(float(v), 0.0), 999.0) for v in box)
            pixels = [int(x1 / 999 * width), int(y1 / 999 * height), int(x2 / 999 * width), int(y2 / 999 * height)]
            boxes.append(Box(label=label.strip(), box=pixels))
    return boxes


def to_markdown(text: str) -> str:
    """Text without grounding tags, with the official LaTeX clean-ups."""
    markdown = GROUNDING.sub("", text)
    for latex, plain in _LATEX_FIXES.items():
        markdown = markdown.replace(latex, plain)
    return re.sub(r"\n{3,}", "\n\n", markdown).strip()
