"""What a failure means for the client, in one table for every door (the routes, the chat stream, the job
runner, ``convert``): the engine's and the decoder's failures become the errors of :mod:`service.errors`.

It sits above the engine, which :mod:`service.errors` (imported by every room) must not know of.
"""

from __future__ import annotations

import logging

from service.errors import (
    INTERNAL_MESSAGE,
    ClientGone,
    DeadlineExceeded,
    DecoderError,
    DecoderUnavailable,
    DeviceFailed,
    InternalError,
    InvalidParameter,
    OutOfMemory,
    ServiceError,
)

log = logging.getLogger(__name__)


def to_service_error(
    exc: BaseException, *, retry_after_s: int, deadline_passed: bool = False, request_id: str | None = None
) -> Exception:
    """What a failure means for the client, in one table for every door (the routes, the chat stream,
    the job runner): the same failure gives the same status, code and message wherever it surfaces.

    Errors that already speak HTTP (a ServiceError, an upload error) pass as they are; an unexpected one
    is logged here with its request id and answered with a message that hides its internals.
    """
    # The engine's failures are imported here, not at the top: the doors import this module without torch.
    from service.engine import Cancelled, PromptTooLong
    from service.engine.decode.contract import DecoderDown, DecoderRefused
    from service.engine.device import DeviceLost, is_device_broken, is_out_of_memory

    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, ServiceError):
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
