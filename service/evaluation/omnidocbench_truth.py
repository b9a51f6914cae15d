"""OmniDocBench's truth: its JSON pages as blocks to match against (``layout_dets`` with categories,
``order``, text/LaTeX/HTML, ``truncated`` relations joined into their first block, attributes;
``page_info`` with the image name and page attributes)."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEXT_CATEGORIES = (
    "text_block", "title", "code_txt", "code_txt_caption", "reference", "equation_caption", "figure_caption",
    "figure_footnote", "table_caption", "table_footnote", "code_algorithm", "code_algorithm_caption", "header",
    "footer", "page_footnote", "page_number",
)  # fmt: skip
IGNORED_IN_TEXT = (
    "figure_caption", "figure_footnote", "table_caption", "table_footnote", "code_algorithm",
    "code_algorithm_caption", "header", "footer", "page_footnote", "page_number", "equation_caption",
)  # fmt: skip


@dataclass(frozen=True)
class TruthBlock:
    """A block of the truth: its category, the text it is compared on, order and attributes."""

    category: str
    content: str
    order: int | None
    attribute: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OmniPage:
    """One page of the benchmark: its image name, attributes and truth blocks."""

    name: str  # the image's file name, e.g. ``paper_12.jpg``
    attributes: dict[str, Any]
    blocks: tuple[TruthBlock, ...]  # text categories and display formulas, in reading order
    tables: tuple[TruthBlock, ...]  # HTML of each table, in reading order


def _merged_truncations(page: dict) -> tuple[list[dict], list[dict]]:
    """Layout blocks with each chain of ``truncated`` blocks joined into its first block."""
    chains: list[list[Any]] = []
    for relation in page.get("extra", {}).get("relation", []):
        if relation.get("relation_type") != "truncated":
            continue
        pair = [relation["source_anno_id"], relation["target_anno_id"]]
        joined = [chain for chain in chains if set(pair) & set(chain)]
        for chain in joined:
            chain.extend(pair)
        if not joined:
            chains.append(pair)
    truncated = {anno for chain in chains for anno in chain}
    kept = [d for d in page["layout_dets"] if d.get("anno_id") not in truncated]
    by_id = {d.get("anno_id"): d for d in page["layout_dets"]}
    merged = []
    for chain in chains:
        parts = sorted((by_id[a] for a in dict.fromkeys(chain) if a in by_id), key=lambda d: d.get("order") or 0)
        first = parts[0]
        merged.append({**first, "text": "".join(p.get("text", "") for p in parts), "attribute": {}})
    return kept, merged


def _truth_text(block: dict) -> str:
    if block["category_type"] == "equation_isolated":
        return str(block.get("latex", ""))
    if block["category_type"] == "table":
        return str(block.get("html", ""))
    return str(block.get("text", ""))


def page_from_json(page: dict) -> OmniPage:
    kept, merged = _merged_truncations(page)
    by_category: dict[str, list[dict]] = defaultdict(list)
    for block in kept + merged:
        by_category[block["category_type"]].append(block)

    def in_order(categories) -> tuple[TruthBlock, ...]:
        chosen = [b for c in categories for b in by_category.get(c, [])]
        chosen.sort(key=lambda b: b.get("order") or 0)
        return tuple(
            TruthBlock(b["category_type"], _truth_text(b), b.get("order"), b.get("attribute") or {}) for b in chosen
        )

    info = page["page_info"]
    return OmniPage(
        name=Path(info["image_path"]).name,
        attributes=info.get("page_attribute", {}),
        blocks=in_order((*TEXT_CATEGORIES, "equation_isolated")),
        tables=in_order(("table",)),
    )


def load_truth(annotations: Path) -> list[OmniPage]:
    """The benchmark's JSON (a list of pages) as ``OmniPage`` objects."""
    entries = json.loads(annotations.read_text(encoding="utf-8"))
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "layout_dets" in e for e in entries):
        raise ValueError(f"{annotations} is not OmniDocBench's annotation JSON (a list of pages with layout_dets)")
    return [page_from_json(entry) for entry in entries]
