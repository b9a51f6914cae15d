"""The OCR engine: DeepSeek-OCR loaded once, RTPrune applied per page."""

from .engine import OCREngine, OcrOptions, PageResult
from .generate import Cancelled
from .loading import DEFAULT_MODEL, ModelLoadError

__all__ = ["DEFAULT_MODEL", "Cancelled", "ModelLoadError", "OCREngine", "OcrOptions", "PageResult"]
