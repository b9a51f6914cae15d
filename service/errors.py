"""Domain errors and the one error schema every error response uses.

Every error body is ``{"error": {"code": ..., "message": ..., "request_id": ...}}``;
``code`` is for machines, ``message`` for people. Validation details keep only each
error's location, message and type, never the input (uploads are not echoed back).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel

log = logging.getLogger(__name__)


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


class DeviceFailed(ServiceError):
    status, code = 503, "device_failed"


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


class TooManyStreams(ServiceError):
    status, code = 429, "too_many_streams"


class NotFinished(ServiceError):
    status, code = 409, "job_not_finished"


# --- the one table: what a failure means for the client ------------------------------------------

INTERNAL_MESSAGE = "the engine failed on this request; the request id is in the server logs"


def to_service_error(
    exc: BaseException, *, retry_after_s: int, deadline_passed: bool = False, request_id: str | None = None
) -> Exception:
    """What a failure means for the client, in one table for every door (the routes, the chat stream,
    the job runner): the same failure gives the same status, code and message wherever it surfaces.

    Errors that already speak HTTP (a ServiceError, an upload error) pass as they are; an unexpected one
    is logged here with its request id and answered with a message that hides its internals.
    """
    # The engine's failures are imported here, not at the top: this module is read without torch.
    from service.engine import Cancelled, PromptTooLong
    from service.engine.decode.contract import DecoderDown, DecoderRefused
    from service.engine.device import DeviceLost, is_device_broken, is_out_of_memory
    from service.inputs import UploadError

    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, ServiceError | UploadError):
        return exc
    if isinstance(exc, Cancelled):
        if deadline_passed:
            return DeadlineExceeded("the request ran past its deadline; its work was cancelled")
        return ClientGone("the request was cancelled")
    if isinstance(exc, PromptTooLong):
        return InvalidParameter(str(exc))
    if isinstance(exc, DecoderDown):
        return DecoderUnavailable(str(exc), headers=retry)
    if isinstance(exc, DecoderRefused):
        return DecoderError(str(exc))
    if isinstance(exc, DeviceLost) or is_device_broken(exc):
        return DeviceFailed(
            "the GPU failed and this replica is restarting; retry (another replica may answer)", headers=retry
        )
    if is_out_of_memory(exc):
        return OutOfMemory(
            "the device ran out of memory on this page even when it ran alone; retry with a smaller mode "
            "or a lower RTPRUNE_MAX_BATCH_TOKENS",
            headers=retry,
        )
    log.error("request %s failed in the engine", request_id or "-", exc_info=exc, extra={"request_id": request_id})
    return InternalError(INTERNAL_MESSAGE)


def validation_message(errors: list[dict[str, Any]]) -> str:
    """pydantic's errors as one sentence a person reads: the first error's field and problem (the rest
    travel in ``details``). The same text whichever door the field came through."""
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query", "header", "form"))
    return f"{where}: {first.get('msg', '')}" if where else str(first.get("msg", "invalid request"))
