"""rtprune-ocr: DeepSeek-OCR with RTPrune visual-token pruning, as an HTTP service."""

__version__ = "0.1.0"
