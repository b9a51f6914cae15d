"""Labelled pages: a folder of images with markdown beside them, or OmniDocBench's annotation JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
# OmniDocBench categories that carry page text, and the field that holds it
_TEXT_FIELDS = {"equation_isolated": "latex", "table": "html"}
_SKIPPED = {"figure", "abandon", "header", "footer", "page_number", "page_footnote", "figure_caption_abandon"}


@dataclass(frozen=True)
class LabelledPage:
    page_id: str
    image: Path
    truth: str


def load_pages(data: Path, limit: int | None = None) -> list[LabelledPage]:
    """Pages of ``data``: a directory (``page.png`` + ``page.md``) or an OmniDocBench JSON file."""
    pages = _from_omnidocbench(data) if data.is_file() and data.suffix == ".json" else _from_folder(data)
    if not pages:
        raise ValueError(
            f"no labelled pages found in {data}: expected images with a same-stem .md beside them, "
            "or OmniDocBench's annotation JSON"
        )
    return pages[:limit] if limit else pages


def _from_folder(folder: Path) -> list[LabelledPage]:
    if not folder.is_dir():
        raise ValueError(f"{folder} is neither a folder nor an OmniDocBench .json file")
    pages = []
    for image in sorted(folder.iterdir()):
        truth = image.with_suffix(".md")
        if image.suffix.lower() in IMAGE_SUFFIXES and truth.exists():
            pages.append(LabelledPage(image.stem, image, truth.read_text()))
    return pages


def _from_omnidocbench(annotations: Path) -> list[LabelledPage]:
    """OmniDocBench: ``[{"page_info": {"image_path": ...}, "layout_dets": [...]}, ...]``; images in
    ``images/`` beside the JSON. The truth is the page's text blocks in reading order."""
    entries = json.loads(annotations.read_text())
    image_dir = annotations.parent / "images"
    pages = []
    for entry in entries:
        name = entry["page_info"]["image_path"]
        blocks = sorted(
            (
                d
                for d in entry.get("layout_dets", [])
                if not d.get("ignore") and d.get("category_type") not in _SKIPPED and d.get("order") is not None
            ),
            key=lambda d: d["order"],
        )
        texts = [str(d.get(_TEXT_FIELDS.get(d.get("category_type"), "text")) or d.get("text") or "") for d in blocks]
        pages.append(LabelledPage(Path(name).stem, image_dir / Path(name).name, "\n\n".join(t for t in texts if t)))
    return pages
