"""Domain errors and the one error schema every error response uses.

Every error body is ``{"error": {"code", "message", "type", "param", "request_id", "details"}}``:
``code`` is for machines, ``message`` a sentence for people, ``type`` and ``param`` what OpenAI's
clients read (``openai.BadRequestError.type`` / ``.param``). A body that fails validation also
carries FastAPI's top-level ``detail`` list, which Mistral's SDK reads. Validation details keep
only each error's location, message and type, never the input (uploads are not echoed back).
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

log = logging.getLogger(__name__)


class ErrorInfo(BaseModel):
    code: str = Field(description="machine-readable, e.g. invalid_parameter, overloaded")
    message: str = Field(description="one sentence for a person")
    type: str = Field(description="OpenAI's error class: invalid_request_error, authentication_error, ...")
    param: str | None = Field(None, description="the request field at fault, dotted (e.g. rtprune.retention)")
    request_id: str | None = None
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
    detail: list[dict[str, Any]] | None = Field(
        None, description="on validation errors only: FastAPI's list of {loc, msg, type} (Mistral's SDK reads it)"
    )


ERROR_TYPES = {  # status -> OpenAI's error class, which OpenAI-compatible clients show
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    """OpenAI's ``error.type`` for a status: what its client (and LiteLLM) expose beside the code."""
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class ServiceError(Exception):
    """An error with an HTTP status, a machine-readable code and optional headers."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.param = param  # the request field at fault, when one is


class UploadError(ServiceError):
    """A problem with the uploaded file itself (too large, corrupt, empty, a page range outside it): its status
    and code are the instance's own."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, param="pages" if code == "invalid_page_range" else None)  # every door's field
        self.status, self.code = status, code


class Overloaded(ServiceError):
    status, code = 503, "overloaded"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class StoreUnavailable(ServiceError):
    """The job database did not answer in time (restarting, or out of reach); nothing was lost."""

    status, code = 503, "store_unavailable"


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


class JsonTooLarge(ServiceError):
    status, code = 413, "json_too_large"


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


class TooManyFetches(ServiceError):
    status, code = 429, "too_many_fetches"


class StorageShareUsed(ServiceError):
    status, code = 429, "storage_share_used"


class NotFinished(ServiceError):
    status, code = 409, "job_not_finished"


class JobCancelled(ServiceError):
    status, code = 409, "job_cancelled"


class JobFailed(ServiceError):
    status, code = 409, "job_failed"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


# --- the one 500 sentence (the table that maps failures to errors is service.failures) -----------------

INTERNAL_MESSAGE = "the engine failed on this request; the request id is in the server logs"


TYPE_TAG = re.compile(r"[\[\]'(-]|^(str|int|float|bool|list|dict|none)$")  # pydantic's union-member labels


def field_path(loc: tuple | list) -> str:
    """A validation error's field as a caller wrote it (``rtprune.retention``, ``messages.0.content``):
    the request part (body, query, ...) and pydantic's union-member labels left out."""
    parts = [str(part) for part in loc[1:] if not TYPE_TAG.search(str(part))] if loc else []
    if loc and str(loc[0]) not in ("body", "query", "header", "form", "path"):
        parts.insert(0, str(loc[0]))
    return ".".join(parts)


def validation_message(
    errors: list[dict[str, Any]], known_fields: list[str] | None = None, name: Callable[[str], str] = str
) -> str:
    """pydantic's errors as one sentence a person reads, the same whichever door the field came through:
    an unknown field names the expected one, a missing field says so, the alternatives of a union are
    joined with "or", and pydantic's wording ("Input should be ...") starts with the field's name, as
    ``name`` writes it (the CLI: ``--max-new-tokens``)."""
    if not errors:
        return "the request is invalid"
    unknown = [e for e in errors if e.get("type") == "extra_forbidden"]
    missing = [name(field_path(e.get("loc", ()))) for e in errors if e.get("type") == "missing"]
    if unknown:
        field = name(field_path(unknown[0].get("loc", ())))
        return f"`{field}` is not a field of this request; {_did_you_mean(field, missing, known_fields)}"
    if missing:
        return f"`{missing[0]}` is required"
    if errors[0].get("type") in ("value_error", "assertion_error"):  # our validators write whole sentences
        return str(errors[0].get("msg", "")).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    field = field_path(errors[0].get("loc", ()))
    alternatives = [_sentence(e) for e in errors if field_path(e.get("loc", ())) == field]
    text = " or ".join(dict.fromkeys(alternatives))  # a union: every member's condition, in order, once
    return f"{name(field)} {text}" if field else text[0].upper() + text[1:]


def _sentence(error: dict[str, Any]) -> str:
    """One error's condition without pydantic's subject: "should be less than or equal to 1"."""
    message = str(error.get("msg", "is invalid"))
    _, _, rest = message.partition(" ")
    if rest.startswith("should"):  # "Input should ...", "String should ...", "List should ..."
        return rest
    return f"is invalid: {message[:1].lower()}{message[1:]}"


def _did_you_mean(name: str, missing: list[str], known: list[str] | None) -> str:
    """Which field the caller probably meant: a required one it left out, else the closest known name."""
    if missing:
        return f"did you mean `{missing[0]}`?"
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], known or [], n=1, cutoff=0.5)
    if close:
        return f"did you mean `{close[0]}`?"
    return f"the fields are: {', '.join(known)}" if known else "see /docs for the fields"
