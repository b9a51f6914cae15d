"""Pick a pruner by name, as the engine, the CLI and the HTTP API do."""

from __future__ import annotations

from typing import Any

from .base import TokenPruner
from .baselines import DivPrune, NoPrune, NormPrune, RandomPrune
from .rtprune import RTPrune

PRUNERS: dict[str, type[TokenPruner]] = {cls.name: cls for cls in (RTPrune, NoPrune, RandomPrune, NormPrune, DivPrune)}
"""Every pruner by its public name: rtprune, none, random, norm, divprune."""


def build_pruner(name: str, keep_ratio: float | None = None, **options: Any) -> TokenPruner:
    """Instantiate the pruner called ``name``; ``keep_ratio=None`` means the dynamic ratio.

    ``options`` go to the pruner's constructor (e.g. ``merge_weight`` for RTPrune,
    ``seed`` for random).
    """
    try:
        cls = PRUNERS[name]
    except KeyError:
        raise ValueError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}") from None
    return cls(keep_ratio, **options)
