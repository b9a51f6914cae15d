"""The evaluation protocols: how a benchmark's pages are read and a page's markdown is scored.

Each protocol turns ``--data`` into pages (an id, an image, the truth), scores one page's
predicted markdown, flattens a page score into a CSV row and summarises a list of them. Its
``headline`` names the summary metrics a grid reports relative to the unpruned model, each with
its direction (an edit distance e counts as accuracy 1 - e, so "relative" is always a share of
the unpruned model's accuracy, the paper's "99.47% of accuracy").
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from . import fox, omnidocbench
from .dataset import load_pages
from .metrics import edit_counts, set_edit_distance
from .omnidocbench_truth import load_truth


@dataclass(frozen=True)
class EvalPage:
    page_id: str  # the image's stem: predictions are ``<page_id>.md``
    image: Path
    truth: Any


class Protocol:
    name: ClassVar[str]
    headline: ClassVar[dict[str, str]]  # summary key -> "lower" or "higher" is better

    def load(self, data: Path, limit: int | None = None) -> list[EvalPage]:
        raise NotImplementedError

    def score(self, page: EvalPage, markdown: str) -> Any:
        raise NotImplementedError

    def record(self, score: Any) -> dict[str, Any]:
        raise NotImplementedError

    def summarize(self, scores: list[Any]) -> dict[str, Any]:
        raise NotImplementedError


def _benchmark_json(data: Path, name: str, images: str, whose: str = "") -> Path:
    """``--data`` as users download a benchmark: its JSON of pages, or the folder holding it beside ``images``."""
    annotations = data / name if data.is_dir() else data
    if not annotations.is_file():
        raise ValueError(f"{data}: expected {whose}{name} (or the folder holding it and {images})")
    return annotations


class OmniDocBench(Protocol):
    """``--data`` is ``OmniDocBench.json`` (images in ``images/`` beside it) or the folder holding both."""

    name = "omnidocbench"
    headline: ClassVar[dict[str, str]] = {
        "text_edit": "lower",
        "formula_edit": "lower",
        "table_teds": "higher",
        "table_teds_s": "higher",
        "reading_order_edit": "lower",
    }

    def __init__(self, match: str = "quick") -> None:
        if match not in omnidocbench.MATCHES:
            raise ValueError(f"match must be one of {', '.join(omnidocbench.MATCHES)}, not {match!r}")
        self.match = match  # quick: the benchmark's default, as the leaderboard and published numbers use

    def load(self, data: Path, limit: int | None = None) -> list[EvalPage]:
        annotations = _benchmark_json(data, "OmniDocBench.json", "images/")
        pages = load_truth(annotations)[:limit]
        return [EvalPage(Path(p.name).stem, annotations.parent / "images" / p.name, p) for p in pages]

    def score(self, page: EvalPage, markdown: str) -> omnidocbench.PageScore:
        return omnidocbench.score_page(page.truth, markdown, match=self.match)

    def record(self, score: omnidocbench.PageScore) -> dict[str, Any]:
        return omnidocbench.page_record(score)

    def summarize(self, scores: list[omnidocbench.PageScore]) -> dict[str, Any]:
        return omnidocbench.summarize(scores)


class Fox(Protocol):
    """``--data`` is Fox's ``en_page_ocr.json`` (images in ``en_pdf_png/`` beside it)."""

    name = "fox"
    headline: ClassVar[dict[str, str]] = {
        "precision": "higher",
        "recall": "higher",
        "f_measure": "higher",
        "bleu": "higher",
        "meteor": "higher",
        "edit_dist": "lower",
    }

    def load(self, data: Path, limit: int | None = None) -> list[EvalPage]:
        annotations = _benchmark_json(data, "en_page_ocr.json", "en_pdf_png/", whose="Fox's ")
        pages = fox.load_truth(annotations)[:limit]
        return [EvalPage(Path(p.name).stem, p.image, p) for p in pages]

    def score(self, page: EvalPage, markdown: str) -> dict[str, Any]:
        return {"page": page.truth.name, **fox.score(page.truth.truth, markdown)}

    def record(self, score: dict[str, Any]) -> dict[str, Any]:
        return score

    def summarize(self, scores: list[dict[str, Any]]) -> dict[str, Any]:
        return fox.summarize(scores)


class Markdown(Protocol):
    """``--data`` is a folder of page images with the truth as a same-stem ``.md`` beside each (or
    ``rtprune-ocr synth``'s output): normalised edit distance of the whole page's markdown."""

    name = "markdown"
    headline: ClassVar[dict[str, str]] = {"text_edit": "lower"}

    def load(self, data: Path, limit: int | None = None) -> list[EvalPage]:
        return [EvalPage(p.page_id, p.image, p.truth) for p in load_pages(data, limit)]

    def score(self, page: EvalPage, markdown: str) -> dict[str, Any]:
        edits, length = edit_counts(markdown, page.truth)
        return {"page": page.page_id, "text_edit": edits / length if length else 0.0, "edits": edits, "length": length}

    def record(self, score: dict[str, Any]) -> dict[str, Any]:
        return score

    def summarize(self, scores: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "pages": len(scores),
            "text_edit": statistics.fmean(s["text_edit"] for s in scores) if scores else None,
            "text_edit_whole": (
                set_edit_distance((s["edits"], s["length"]) for s in scores)
                if any(s["length"] for s in scores)
                else None
            ),
        }


PROTOCOLS: dict[str, type[Protocol]] = {p.name: p for p in (OmniDocBench, Fox, Markdown)}


def relative(value: float | None, baseline: float | None, direction: str) -> float | None:
    """The share of the baseline's accuracy kept: s / s0, or (1 - e) / (1 - e0) for an edit distance."""
    if value is None or baseline is None:
        return None
    accuracy, base = (value, baseline) if direction == "higher" else (1.0 - value, 1.0 - baseline)
    return accuracy / base if base > 0 else None


def find_prediction(folder: Path, page_id: str) -> Path | None:
    """A page's prediction under the names OmniDocBench's evaluator accepts (``x.md``, ``x.mmd``,
    ``x.pdf`` page names without ``.pdf``, ``<image name>.md``)."""
    for name in (f"{page_id}.md", f"{page_id.replace('.pdf', '')}.mmd", f"{page_id.replace('.pdf', '')}.md"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob(f"{page_id}.*.md"))
    return found[0] if found else None
