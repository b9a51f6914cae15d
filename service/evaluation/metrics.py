"""Text metrics as OmniDocBench computes them, on top of rapidfuzz's edit distance.

Normalised edit distance (NED) = Levenshtein distance / max(len(prediction), len(truth)),
computed after the same clean-up of grounding tags the service applies to its markdown.
Over a set, OmniDocBench sums distances and lengths before dividing.
"""

from __future__ import annotations

from collections.abc import Iterable

from rapidfuzz.distance import Levenshtein

from service.engine.postprocess import to_markdown


def clean(text: str) -> str:
    """Grounding tags removed, whitespace trimmed: what both sides are compared as."""
    return to_markdown(text)


def edit_counts(prediction: str, truth: str) -> tuple[int, int]:
    """(Levenshtein distance, max length) after clean-up; the pair OmniDocBench sums over a set."""
    prediction, truth = clean(prediction), clean(truth)
    return Levenshtein.distance(prediction, truth), max(len(prediction), len(truth))


def normalized_edit_distance(prediction: str, truth: str) -> float:
    """0 for identical texts, 1 for nothing in common; two empty texts are identical."""
    distance, length = edit_counts(prediction, truth)
    return distance / length if length else 0.0


def set_edit_distance(pairs: Iterable[tuple[int, int]]) -> float:
    """Sum of distances over sum of lengths, from ``edit_counts`` pairs."""
    distances, lengths = 0, 0
    for distance, length in pairs:
        distances += distance
        lengths += length
    return distances / lengths if lengths else 0.0

