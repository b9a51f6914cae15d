"""Labelled pages: a folder of images with their markdown beside them (``--protocol markdown``).

OmniDocBench and Fox have their own loaders (``omnidocbench.py``, ``fox.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}


@dataclass(frozen=True)
class LabelledPage:
    page_id: str
    image: Path
    truth: str


def load_pages(data: Path, limit: int | None = None) -> list[LabelledPage]:
    """Pages of ``data``: a directory of ``page.png`` + ``page.md``."""
    pages = _from_folder(data)
    if not pages:
        raise ValueError(
            f"no labelled pages found in {data}: expected images with a same-stem .md beside them "
            "(for OmniDocBench or Fox, pass --protocol omnidocbench or --protocol fox)"
        )
    return pages[:limit] if limit else pages


def _from_folder(folder: Path) -> list[LabelledPage]:
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder (for OmniDocBench or Fox, pass --protocol omnidocbench or fox)")
    pages = []
    for image in sorted(folder.iterdir()):
        truth = image.with_suffix(".md")
        if image.suffix.lower() in IMAGE_SUFFIXES and truth.exists():
            pages.append(LabelledPage(image.stem, image, truth.read_text()))
    return pages
