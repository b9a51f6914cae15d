"""The JSON response every route and error answers with: FastAPI's, ending in a newline.

A body that ends without one leaves a shell prompt glued to the end of ``curl``'s output, and
line-oriented tools (``jq -c``, ``tail``, log shippers reading saved answers) expect it.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse as FastAPIJSONResponse


class JSONResponse(FastAPIJSONResponse):
    def render(self, content: Any) -> bytes:
        # as FastAPI's, but a lone surrogate a client sent (JSON allows "\ud800") and an answer repeats
        # becomes U+FFFD instead of failing the encoding with a 500
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
        return text.encode("utf-8", errors="replace") + b"\n"
