"""The JSON response every route and error answers with: FastAPI's, ending in a newline.

A body that ends without one leaves a shell prompt glued to the end of ``curl``'s output, and
line-oriented tools (``jq -c``, ``tail``, log shippers reading saved answers) expect it.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse as FastAPIJSONResponse


class JSONResponse(FastAPIJSONResponse):
    def render(self, content: Any) -> bytes:
        return super().render(content) + b"\n"
