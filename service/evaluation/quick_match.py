"""OmniDocBench's default matching, ``quick_match``: truth and predicted blocks paired many-to-many.

Reimplemented from the published behaviour of the benchmark's evaluator (``utils/match_quick.py`` at
pichiu/OmniDocBench 7bd6c2e, Apache-2.0; read, not copied), on lines that are already normalised.
The steps, in the evaluator's order:

1. A page with no truth, no prediction, or one of each is settled at once.
2. Truth blocks of the ignored categories (headers, footers, captions, page numbers, ...) are
   matched first: every predicted block within 0.25 normalised edit distance of one of them leaves
   the pool, and those truth blocks take no further part.
3. For every remaining truth block, runs of consecutive predicted blocks are merged while each
   added block lies within the truth (fuzzy substring distance < 0.6) and the merged distance does
   not grow: a paragraph the model split in two is matched whole. Overlapping candidate runs are
   settled by the lowest average distance.
4. The Hungarian assignment on normalised edit distance; pairs above 0.7 are undone.
5. A truth block still unmatched that appears inside a predicted block (fuzzy substring distance
   < 0.4) joins that block's match: several truth blocks a model merged into one are matched whole.
6. What is left on both sides is paired once more by the Hungarian assignment, with no threshold;
   truth blocks left over after that have no match. Predicted blocks left over are not charged.

The result is groups of truth indices and predicted indices; a group is scored on its lines joined
without a separator, as the evaluator's metrics do. Its timeout is kept too: a page whose matching
runs past ``deadline_s`` (30 s in the evaluator) is matched the simple way instead (the caller's).
Where the evaluator's own bookkeeping misaligns (an entry skipped while a list is changed during its
iteration), the intended behaviour is implemented; those cases need inline-formula-only leftovers
and were not met on the benchmark's pages.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist
from scipy.optimize import linear_sum_assignment

IGNORE_THRESHOLD = 0.25  # a predicted block this close to an ignored truth block leaves the pool
MERGE_THRESHOLD = 0.6  # a predicted block added to a run must lie this close inside the truth
MATCH_THRESHOLD = 0.7  # an assigned pair further apart than this is undone
INSIDE_THRESHOLD = 0.4  # an unmatched truth block this close inside a predicted block joins its match


class MatchTimeout(Exception):
    """The matching ran past its deadline; the caller falls back to simple matching."""


@dataclass(frozen=True)
class Group:
    """Truth blocks matched together to predicted blocks (either side may be empty)."""

    truths: tuple[int, ...]
    preds: tuple[int, ...]


def normalized_distance(a: str, b: str) -> float:
    """Edit distance over the longer length; two empty strings are equal."""
    return Levenshtein.normalized_distance(a, b)


def distance_matrix(rows: Sequence[str], cols: Sequence[str]) -> np.ndarray:
    if not rows or not cols:
        return np.zeros((len(rows), len(cols)))
    return cdist(rows, cols, scorer=Levenshtein.normalized_distance, dtype=np.float64)


def best_window(long: str, short: str) -> float | None:
    """The smallest distance between ``short`` and a same-length window of ``long``, over len(short);
    None when ``short`` is empty or longer than ``long`` (the evaluator's fuzzy substring match)."""
    if not short or len(short) > len(long):
        return None
    width = len(short)
    return min(Levenshtein.distance(long[i : i + width], short) for i in range(len(long) - width + 1)) / width


class _Clock:
    def __init__(self, deadline_s: float | None) -> None:
        self.deadline = None if deadline_s is None else time.monotonic() + deadline_s

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise MatchTimeout


def quick_match(
    truths: Sequence[str],
    categories: Sequence[str],
    preds: Sequence[str],
    ignored: frozenset[str] | set[str],
    deadline_s: float | None = 30.0,
) -> list[Group]:
    """Match normalised truth lines (with their categories, in reading order) to normalised predicted
    lines (in page order); raises MatchTimeout past ``deadline_s``."""
    clock = _Clock(deadline_s)
    if not truths:
        return [Group((), tuple(range(len(preds))))] if preds else []
    if not preds:
        return [Group((i,), ()) for i in range(len(truths))]
    if len(truths) == 1 and len(preds) == 1:
        return [Group((0,), (0,))]
    ignored_truths = [i for i, category in enumerate(categories) if category in ignored]
    kept_truths = [i for i, category in enumerate(categories) if category not in ignored]
    near_ignored = distance_matrix([truths[i] for i in ignored_truths], preds) < IGNORE_THRESHOLD
    taken = set(np.flatnonzero(near_ignored.any(axis=0)).tolist()) if ignored_truths else set()
    kept_preds = [j for j in range(len(preds)) if j not in taken]
    groups = _match_main([truths[i] for i in kept_truths], [preds[j] for j in kept_preds], clock)
    main = [Group(tuple(kept_truths[i] for i in g.truths), tuple(kept_preds[j] for j in g.preds)) for g in groups]
    ignored_groups = [Group((i,), ()) for i in ignored_truths]  # never scored: kept so every truth is present
    return main + ignored_groups


def _match_main(truths: list[str], preds: list[str], clock: _Clock) -> list[Group]:
    costs = distance_matrix(truths, preds)
    merged_costs, runs = _merge_split_paragraphs(costs, truths, preds, clock)
    rows, cols = linear_sum_assignment(merged_costs) if merged_costs.size else ([], [])
    matches: dict[int, tuple[int, ...]] = {}  # truth -> its predicted run
    for row, col in zip(rows, cols, strict=True):
        if merged_costs[row, col] <= MATCH_THRESHOLD:
            matches[int(row)] = runs[int(col)]
    unmatched = [i for i in range(len(truths)) if i not in matches]
    inside = _truths_inside_preds(unmatched, truths, preds, clock)
    return _groups(matches, inside, truths, preds)


def _merge_split_paragraphs(
    costs: np.ndarray, truths: list[str], preds: list[str], clock: _Clock
) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """The cost matrix over predicted runs: each truth block not already close to a predicted block
    proposes the run of consecutive predictions that fits it best; the chosen runs replace their
    blocks (joined with a space), and the matrix is computed again."""
    close = np.argwhere(costs < IGNORE_THRESHOLD)
    close_truths, close_preds = set(close[:, 0].tolist()), set(close[:, 1].tolist())
    free_preds = [j for j in range(len(preds)) if j not in close_preds]
    proposals: list[tuple[tuple[int, ...], float]] = []
    for i in (i for i in range(len(truths)) if i not in close_truths):
        best: tuple[tuple[int, ...], float] | None = None
        for start in free_preds:
            clock.check()
            run = _grow_run(truths[i], preds, start, close_preds)
            cost = normalized_distance(truths[i], " ".join(preds[j] for j in run))
            if best is None or cost < best[1]:
                best = (run, cost)
        if best is not None:
            proposals.append(best)
    chosen = _non_overlapping(proposals)
    if not chosen:
        return costs, [(j,) for j in range(len(preds))]
    runs: list[tuple[int, ...]] = []
    starts = {run[0]: run for run in chosen}
    j = 0
    while j < len(preds):
        run = starts.get(j, (j,))
        runs.append(run)
        j = run[-1] + 1
    lines = [" ".join(preds[k] for k in run) for run in runs]
    return distance_matrix(truths, lines), runs


def _grow_run(truth: str, preds: list[str], start: int, close_preds: set[int]) -> tuple[int, ...]:
    """From ``start``, add the next predicted blocks while each fits inside ``truth`` and the run's
    distance to it does not grow; stop once the run is as long as the truth."""
    end = start + 1
    while end < len(preds) and end not in close_preds:
        fits, go_on = _adding_fits(truth, preds[start : end + 1])
        if not fits:
            break
        end += 1
        if not go_on:
            break
    return tuple(range(start, end))


def _adding_fits(truth: str, run: list[str]) -> tuple[bool, bool]:
    """Whether the run's last block may join it, and whether the run may grow further."""
    current, merged = " ".join(run[:-1]), " ".join(run)
    if normalized_distance(truth, merged) > normalized_distance(truth, current):
        return False, False
    inside = [best_window(truth, block) for block in run[:-1]]
    if any(d is None or d > MERGE_THRESHOLD for d in inside):
        return False, False
    added = best_window(truth, run[-1])
    if added is None:
        return False, False
    return added < MERGE_THRESHOLD, len(merged) <= len(truth)


def _non_overlapping(proposals: list[tuple[tuple[int, ...], float]]) -> list[tuple[int, ...]]:
    """Settle overlapping runs: runs that overlap in a chain form a cluster; within a cluster each
    run joins every path it does not overlap (a duplicate run keeps its lower cost), else starts a
    path; the path of the lowest average cost wins."""
    if not proposals:
        return []
    ordered = sorted(proposals, key=lambda p: p[0][0])
    clusters: list[list[tuple[tuple[int, ...], float]]] = [[ordered[0]]]
    for proposal in ordered[1:]:
        if any(set(proposal[0]) & set(other[0]) for other in clusters[-1]):
            clusters[-1].append(proposal)
        else:
            clusters.append([proposal])
    chosen: list[tuple[int, ...]] = []
    for cluster in clusters:
        if len(cluster) == 1:
            chosen.append(cluster[0][0])
            continue
        paths: list[list[tuple[tuple[int, ...], float]]] = [[cluster[0]]]
        for run, cost in cluster[1:]:
            joined_any = False
            for path in paths:
                same = [k for k, (other, _) in enumerate(path) if other == run]
                if same:
                    if path[same[0]][1] > cost:
                        path.pop(same[0])
                        path.append((run, cost))
                    joined_any = True
                elif not any(set(run) & set(other) for other, _ in path):
                    path.append((run, cost))
                    joined_any = True
            if not joined_any:
                paths.append([(run, cost)])
        best = min(paths, key=lambda path: sum(c for _, c in path) / len(path))  # first of equal averages
        chosen.extend(run for run, _ in best)
    return chosen


def _truths_inside_preds(
    unmatched: list[int], truths: list[str], preds: list[str], clock: _Clock
) -> dict[int, list[int]]:
    """predicted block -> the unmatched truth blocks that appear inside it."""
    inside: dict[int, list[int]] = {}
    for j, pred in enumerate(preds):
        hits = []
        for i in unmatched:
            clock.check()
            distance = best_window(pred, truths[i])
            if distance is not None and distance < INSIDE_THRESHOLD:
                hits.append(i)
        if hits:
            inside[j] = hits
    return inside


def _groups(
    matches: dict[int, tuple[int, ...]], inside: dict[int, list[int]], truths: list[str], preds: list[str]
) -> list[Group]:
    """Matches and inside-hits as groups keyed by their predicted run; then what is left on both sides
    paired once more; then each truth block still alone."""
    by_run: dict[tuple[int, ...], list[int]] = {}
    placed: set[int] = set()
    for i in sorted(matches):
        run = matches[i]
        if run in by_run:
            by_run[run].append(i)
        else:
            by_run[run] = [i]
        placed.add(i)
    for j in sorted(inside):
        fresh = [i for i in inside[j] if i not in placed]
        by_run.setdefault((j,), []).extend(fresh)
        placed.update(fresh)
    groups = [Group(tuple(sorted(set(ts))), run) for run, ts in by_run.items() if ts]
    used_preds = {
        j for run in by_run for j in run
    }  # a run whose truths were all placed elsewhere still uses its blocks
    left_truths = [i for i in range(len(truths)) if i not in placed]
    left_preds = [j for j in range(len(preds)) if j not in used_preds]
    if left_truths and left_preds:
        costs = distance_matrix([truths[i] for i in left_truths], [preds[j] for j in left_preds])
        for row, col in zip(*linear_sum_assignment(costs), strict=True):
            groups.append(Group((left_truths[row],), (left_preds[col],)))
            placed.add(left_truths[row])
    elif left_preds:
        groups.append(Group((), tuple(left_preds)))
    groups.extend(Group((i,), ()) for i in range(len(truths)) if i not in placed)
    return groups


def majority_category(categories: Sequence[str], group: Group, ignored: frozenset[str] | set[str]) -> str:
    """A group's category: the most common of its truth blocks' categories, ignored ones only when there
    is nothing else (first seen wins a tie)."""
    names = [categories[i] for i in group.truths]
    kept = [name for name in names if name not in ignored]
    return Counter(kept or names).most_common(1)[0][0]
