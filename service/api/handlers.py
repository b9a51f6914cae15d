"""Map every error onto the one error schema; installed once by the app factory.

Invalid parameters are 422 on this service's own routes (FastAPI's convention, and Mistral's on its
OCR route) and 400 on the OpenAI-compatible routes, as OpenAI and vLLM answer them: the ``openai``
client then raises ``BadRequestError`` with ``type`` and ``param``, as it would against OpenAI.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.responses import JSONResponse
from service.errors import ErrorInfo, ErrorResponse, ServiceError, error_type, field_path, validation_message

log = logging.getLogger(__name__)


class UploadTooLarge(StarletteHTTPException):
    """Raised while the body is being read; an HTTPException so FastAPI's body parsing passes it on."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the {limit:,}-byte upload limit")
        self.code = "upload_too_large"


class UploadStalled(StarletteHTTPException):
    """The client stopped sending its body, or sends it too slowly to finish (a slow-body attack holds a
    request slot for as long as it likes otherwise); an HTTPException so FastAPI's body parsing passes it on."""

    def __init__(self, timeout_s: float, message: str | None = None) -> None:
        message = message or f"the upload sent nothing for {timeout_s:g} s; send the body without pauses"
        super().__init__(408, message)
        self.code = "request_timeout"


OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")


def error_json(
    status: int,
    code: str,
    message: str,
    request_id: str | None,
    *,
    headers: dict[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
    param: str | None = None,
) -> JSONResponse:
    """The one error body: handlers and the plain-ASGI middlewares (which have no Request) both use it.
    ``param`` is kept even when None (OpenAI's bodies always have it)."""
    # one problem: the message says it, and `detail` carries its location
    details_said = None if details and len(details) == 1 and details[0]["msg"] == message else details
    info = ErrorInfo(
        code=code, message=message, type=error_type(status), param=param, request_id=request_id, details=details_said
    )
    detail = [{"loc": d["loc"], "msg": d["msg"], "type": d["type"]} for d in details] if details else None
    if detail is None and status == 422:  # a check of ours, not pydantic's: one entry, for Mistral's SDK
        detail = [{"loc": ["body", *(param.split(".") if param else [])], "msg": message, "type": code}]
    body = ErrorResponse(error=info, detail=detail).model_dump(exclude_none=True)
    body["error"].setdefault("param", None)
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(
    request: Request | None,
    status: int,
    code: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
    param: str | None = None,
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None) if request is not None else None
    if status == 422 and request is not None and request.url.path.startswith(OPENAI_PATHS):
        status = 400  # OpenAI's and vLLM's status for an invalid parameter
    return error_json(status, code, message, request_id, headers=headers, details=details, param=param)


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return error_response(request, exc.status, exc.code, exc.message, headers=exc.headers, param=exc.param)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")).removeprefix("Value error, "), "type": e["type"]}
        for e in exc.errors()
    ]
    if any(d["type"] == "json_invalid" for d in details):  # not a parameter problem: the body is not JSON
        at = next((d["loc"][-1] for d in details if d["type"] == "json_invalid"), None)
        where = f" (at character {at})" if isinstance(at, int) else ""
        return error_response(request, 400, "invalid_json", f"the request body is not valid JSON{where}")
    message = validation_message(details, known_fields(request, details[0]["loc"] if details else []))
    at_fault = next((d for d in details if d["type"] == "extra_forbidden"), details[0] if details else None)
    param = field_path(at_fault["loc"]) if at_fault else None
    return error_response(request, 422, "invalid_parameter", message, details=details, param=param or None)


def known_fields(request: Request, loc: list) -> list[str]:
    """The field names a request body may have at ``loc`` (its parent object), for "did you mean":
    read from the route's body model, following nested models along the location."""
    field = getattr(request.scope.get("route"), "body_field", None)
    model = getattr(getattr(field, "field_info", None), "annotation", None)
    for part in [p for p in loc[1:-1] if isinstance(p, str)]:
        inner = getattr(model, "model_fields", {}).get(part)
        model = next((a for a in _members(inner.annotation) if hasattr(a, "model_fields")), None) if inner else None
    return list(getattr(model, "model_fields", {}))


def _members(annotation: Any) -> list[Any]:
    """A type and the members of a union (``Model | None``)."""
    return [annotation, *getattr(annotation, "__args__", ())]


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = getattr(exc, "code", None) or {
        404: "not_found",
        405: "method_not_allowed",
        400: "bad_request",
        413: "upload_too_large",
    }.get(exc.status_code, "http_error")
    return error_response(request, exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))


async def _not_unicode(request: Request, exc: UnicodeEncodeError) -> JSONResponse:
    """JSON may carry a lone surrogate ("\\ud800"), which no text field can hold: the client's mistake."""
    message = "the request holds text that is not valid Unicode (a lone surrogate, e.g. \\ud800)"
    return error_response(request, 422, "invalid_parameter", message)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", extra={"request_id": getattr(request.state, "request_id", None)})
    return error_response(request, 500, "internal_error", "internal server error; the request id is in the logs")


def install_error_handlers(app: FastAPI) -> None:
    """All handlers in one place, so every error leaves in the same shape."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(UnicodeEncodeError, _not_unicode)
    app.add_exception_handler(Exception, _unhandled)
