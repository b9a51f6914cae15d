"""The OCR engine: DeepSeek-OCR loaded once, RTPrune applied per page.

Names are imported on first use (PEP 562), so ``service.engine.names`` and the settings can be
read (e.g. by ``rtprune-ocr --help``) without importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from .names import DEFAULT_MODEL, RANDOM_WEIGHTS_WARNING

_LAZY = {
    "OCREngine": ".engine",
    "OcrOptions": ".options",
    "PageResult": ".engine",
    "PromptTooLong": ".engine",
    "resolve_options": ".options",
    "Cancelled": ".decode.sequence",
    "ModelLoadError": ".weights.loading",
}

__all__ = ["DEFAULT_MODEL", "RANDOM_WEIGHTS_WARNING", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
