"""Model names the rest of the service needs without loading torch (settings, CLI help)."""

from __future__ import annotations

import difflib

DEFAULT_MODEL = "deepseek-ai/DeepSeek-OCR"
RANDOM_PRESETS = ("tiny", "tiny-v2", "random-full")
RANDOM_WEIGHTS_WARNING = "model {name!r} has RANDOM weights: its text is meaningless (a preset for tests and try-outs)"


def near_presets(name: str) -> list[str]:
    """Presets that ``name`` may have meant (``tinyy`` -> ``tiny``)."""
    return difflib.get_close_matches(name.lower(), RANDOM_PRESETS, n=2, cutoff=0.6)
