"""The OCR engine: DeepSeek-OCR loaded once, RTPrune applied per page.

Names are imported on first use (PEP 562), so ``service.engine.names`` and the settings can be
read (e.g. by ``rtprune-ocr --help``) without importing torch and transformers; type checkers and
IDEs read the same names from the ``TYPE_CHECKING`` imports below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .names import DEFAULT_MODEL, RANDOM_WEIGHTS_WARNING

if TYPE_CHECKING:
    from .decode.sequence import Cancelled as Cancelled
    from .engine import OCREngine as OCREngine
    from .options import OcrOptions as OcrOptions
    from .options import resolve_options as resolve_options
    from .page import PageResult as PageResult
    from .page import PageTask as PageTask
    from .page import PromptTooLong as PromptTooLong
    from .weights.loading import ModelLoadError as ModelLoadError

_LAZY = {
    "OCREngine": ".engine",
    "OcrOptions": ".options",
    "PageResult": ".page",
    "PageTask": ".page",
    "PromptTooLong": ".page",
    "resolve_options": ".options",
    "Cancelled": ".decode.sequence",
    "ModelLoadError": ".weights.loading",
}

__all__ = ["DEFAULT_MODEL", "RANDOM_WEIGHTS_WARNING", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
