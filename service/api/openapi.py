"""The OpenAPI document, made truthful where FastAPI's generator is not.

A route that takes a pydantic model as ``Form()`` is described as
``application/x-www-form-urlencoded``, so ``/docs`` "Try it out" cannot upload a file and
generated clients send the wrong content type. Upload routes are multipart; this moves their
request body there (the schema itself, limits and patterns included, comes from the form
model).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

UPLOAD_PATHS = ("/v1/ocr",)


def describe_uploads_as_multipart(app: FastAPI) -> None:
    """Wrap ``app.openapi`` so upload routes declare ``multipart/form-data``."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        for path in UPLOAD_PATHS:
            content = schema["paths"][path]["post"]["requestBody"]["content"]
            form = content.pop("application/x-www-form-urlencoded", None)
            if form is not None:
                content["multipart/form-data"] = {**form, "encoding": {"file": {"contentType": "*/*"}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
