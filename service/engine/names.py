"""The service's vocabulary, importable without torch: model names, modes, tasks, position schemes and
pruner names. The settings, the options model and the CLI's flags (``rtprune-ocr --help``) read them
here; the modules that compute with them (preprocess, prompts, assemble, pruning) import them from here.
"""

from __future__ import annotations

import difflib
from enum import StrEnum

DEFAULT_MODEL = "deepseek-ai/DeepSeek-OCR"
RANDOM_PRESETS = ("tiny", "tiny-v2", "random-full")
RANDOM_WEIGHTS_WARNING = "model {name!r} has RANDOM weights: its text is meaningless (a preset for tests and try-outs)"


class Mode(StrEnum):
    """DeepSeek-OCR resolution modes (README names)."""

    tiny = "tiny"
    small = "small"
    base = "base"
    large = "large"
    gundam = "gundam"


MODES_BY_VERSION: dict[str, tuple[Mode, ...]] = {
    "v1": (Mode.tiny, Mode.small, Mode.base, Mode.large, Mode.gundam),
    "v2": (Mode.small, Mode.gundam),  # DeepSeek-OCR-2: one 768 view, or 1024 global + 768 tiles
}


class Task(StrEnum):
    """The official prompts (see :mod:`.prompts`)."""

    markdown = "markdown"
    ocr = "ocr"
    free = "free"
    figure = "figure"
    describe = "describe"
    locate = "locate"


class Positions(StrEnum):
    """Position ids of the kept visual tokens: their unpruned ones (the authors' scheme) or 0..L-1."""

    original = "original"
    compact = "compact"


PRUNER_NAMES = ("rtprune", "none", "random", "norm", "divprune")  # pruning.PRUNERS' keys (a test keeps them equal)


def near_presets(name: str) -> list[str]:
    """Presets that ``name`` may have meant (``tinyy`` -> ``tiny``)."""
    return difflib.get_close_matches(name.lower(), RANDOM_PRESETS, n=2, cutoff=0.6)
