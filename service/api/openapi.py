"""The OpenAPI document, made truthful where FastAPI's generator is not.

A route that takes a pydantic model as ``Form()`` is described as
``application/x-www-form-urlencoded``, so ``/docs`` "Try it out" cannot upload a file and
generated clients send the wrong content type. Upload routes are multipart; this moves their
request body there (the schema itself, limits and patterns included, comes from the form
model); ``/v1/jobs`` takes the same form. ``/v1/ocr`` also takes a JSON body (Mistral's OCR shape, a
second route that FastAPI cannot list under the same path and method): it is added as a second content
type.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

UPLOAD_PATHS = ("/v1/ocr", "/v1/jobs")


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
        add_json_alternative(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def add_json_alternative(schema: dict[str, Any]) -> None:
    """List the JSON (Mistral-shaped) request and response of ``/v1/ocr`` beside the form's."""
    from service.api.mistral_ocr import MistralOcrRequest, MistralOcrResponse

    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (MistralOcrRequest, MistralOcrResponse):
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(model_schema.pop("$defs", {}))
        components[model.__name__] = model_schema
    operation = schema["paths"]["/v1/ocr"]["post"]
    operation["requestBody"]["content"]["application/json"] = {
        "schema": {"$ref": "#/components/schemas/MistralOcrRequest"}
    }
    ok = operation["responses"]["200"]["content"]["application/json"]
    ok["schema"] = {"anyOf": [ok["schema"], {"$ref": "#/components/schemas/MistralOcrResponse"}]}
