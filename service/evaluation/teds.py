"""Table similarity by tree edit distance (TEDS, and TEDS-S on structure alone).

TEDS = 1 - APTED(prediction, truth) / max(nodes), where renaming a cell costs the normalised
edit distance of its tokens and any tag/colspan/rowspan change costs 1 (Zhong et al., 2020).
The tree conversion and cost model are docling-metrics-table's (MIT); the tables compared
are the ``<table>`` under ``<html><body>`` of ``normalize.normalize_table``'s output, and a
table that is missing or cannot be parsed scores 0, as in OmniDocBench.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _scorer():
    from docling_metrics_table.utils.teds import TEDScorer

    return TEDScorer()


def _table(document: str):
    from lxml import html

    parsed = html.fromstring(document, parser=html.HTMLParser(remove_comments=True, encoding="utf-8"))
    tables = parsed.xpath("body/table")
    return tables[0] if tables else None


def teds(prediction: str, truth: str, structure_only: bool = False) -> float:
    """TEDS of two normalised table documents, in [0, 1]; 0 when either is empty or unreadable."""
    if not prediction or not truth:
        return 0.0
    try:
        predicted, expected = _table(prediction), _table(truth)
        if predicted is None or expected is None:
            return 0.0
        return _scorer().teds(expected, predicted, structure_only=structure_only)
    except Exception:
        return 0.0
