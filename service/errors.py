"""Domain errors and the one error schema every error response uses.

Every error body is ``{"error": {"code": ..., "message": ..., "request_id": ...}}``;
``code`` is for machines, ``message`` for people. Validation details keep only each
error's location, message and type, never the input (uploads are not echoed back).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorInfo(BaseModel):
    code: str
    message: str
    request_id: str | None = None
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ServiceError(Exception):
    """An error with an HTTP status, a machine-readable code and optional headers."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class Overloaded(ServiceError):
    status, code = 503, "overloaded"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class DeadlineExceeded(ServiceError):
    status, code = 504, "deadline_exceeded"


class OutOfMemory(ServiceError):
    status, code = 503, "out_of_memory"


class DecoderUnavailable(ServiceError):
    status, code = 503, "decoder_unavailable"


class DecoderError(ServiceError):
    status, code = 502, "decoder_error"


class ClientGone(ServiceError):
    status, code = 499, "client_closed_request"


class PayloadTooLarge(ServiceError):
    status, code = 413, "upload_too_large"


class InvalidParameter(ServiceError):
    status, code = 422, "invalid_parameter"


class InternalError(ServiceError):
    status, code = 500, "internal_error"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class TooManyJobs(ServiceError):
    status, code = 429, "too_many_jobs"


class NotFinished(ServiceError):
    status, code = 409, "job_not_finished"
