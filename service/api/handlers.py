"""Map every error onto the one error schema; installed once by the app factory."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ErrorInfo, ErrorResponse, ServiceError, validation_message
from service.inputs import UploadError

log = logging.getLogger(__name__)


class UploadTooLarge(StarletteHTTPException):
    """Raised while the body is being read; an HTTPException so FastAPI's body parsing passes it on."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the {limit:,}-byte upload limit")
        self.code = "upload_too_large"


class UploadStalled(StarletteHTTPException):
    """The client stopped sending its body; an HTTPException so FastAPI's body parsing passes it on."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the upload sent nothing for {timeout_s:g} s; send the body without pauses")
        self.code = "request_timeout"


def error_json(
    status: int,
    code: str,
    message: str,
    request_id: str | None,
    *,
    headers: dict[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    """The one error body: handlers and the plain-ASGI middlewares (which have no Request) both use it."""
    body = ErrorResponse(error=ErrorInfo(code=code, message=message, request_id=request_id, details=details))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def error_response(
    request: Request | None,
    status: int,
    code: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None) if request is not None else None
    return error_json(status, code, message, request_id, headers=headers, details=details)


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return error_response(request, exc.status, exc.code, exc.message, headers=exc.headers)


async def _upload_error(request: Request, exc: UploadError) -> JSONResponse:
    return error_response(request, exc.status, exc.code, exc.message)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
    ]
    if any(d["type"] == "json_invalid" for d in details):  # not a parameter problem: the body is not JSON
        at = next((d["loc"][-1] for d in details if d["type"] == "json_invalid"), None)
        where = f" (at character {at})" if isinstance(at, int) else ""
        return error_response(request, 400, "invalid_json", f"the request body is not valid JSON{where}")
    return error_response(request, 422, "invalid_parameter", validation_message(details), details=details)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = getattr(exc, "code", None) or {
        404: "not_found",
        405: "method_not_allowed",
        400: "bad_request",
        413: "upload_too_large",
    }.get(exc.status_code, "http_error")
    return error_response(request, exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", extra={"request_id": getattr(request.state, "request_id", None)})
    return error_response(request, 500, "internal_error", "internal server error; the request id is in the logs")


def install_error_handlers(app: FastAPI) -> None:
    """All handlers in one place, so every error leaves in the same shape."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(UploadError, _upload_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
