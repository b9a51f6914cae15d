"""The OCR engine: DeepSeek-OCR loaded once, RTPrune applied per page."""

from .engine import OCREngine, OcrOptions, PageResult, PromptTooLong, resolve_options
from .generate import Cancelled
from .loading import DEFAULT_MODEL, RANDOM_WEIGHTS_WARNING, ModelLoadError

__all__ = [
    "DEFAULT_MODEL",
    "RANDOM_WEIGHTS_WARNING",
    "Cancelled",
    "ModelLoadError",
    "OCREngine",
    "OcrOptions",
    "PageResult",
    "PromptTooLong",
    "resolve_options",
]
