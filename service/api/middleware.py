"""Cross-cutting concerns as plain ASGI middlewares: request id + access log, API key, body limit,
admission (a full queue refuses an upload before its body is read).

Plain ASGI (not ``BaseHTTPMiddleware``) so streaming bodies pass through untouched and the
body limit can act while the upload is being read.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.data_urls import STATE_KEY, json_beside_images, lift_images
from service.api.handlers import UploadStalled, UploadTooLarge, error_json
from service.api.shares import ClientShares
from service.errors import JsonTooLarge, Unauthorized
from service.metrics import Metrics

log = logging.getLogger("rtprune_ocr.access")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/redoc", "/static/")
OPEN_EXACT = {"/"}  # the try-out page; its API calls carry the key
PROBE_PATHS = ("/healthz", "/readyz", "/metrics")  # logged at DEBUG


class RequestContextMiddleware:
    """Give every request an id (``X-Request-ID`` in and out) and log one structured line per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get("x-request-id", "")
        request_id = incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = False
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Logged here, once, with the request id; Starlette's outer error middleware would log it
            # again through the server after its handler ran, so it never sees it.
            log.exception("unhandled error", extra={"request_id": request_id})
            if started:
                raise
            response = error_json(
                500, "internal_error", "internal server error; the request id is in the logs", request_id
            )
            await response(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            if scope["path"] in ("/v1/ocr", "/v1/chat/completions", "/v1/jobs"):
                self.metrics.requests.labels(str(status)).inc()
                self.metrics.request_seconds.observe(elapsed)
            quiet = scope["path"] in PROBE_PATHS  # a probe every few seconds is not news (its 503 while loading either)
            log.log(
                logging.DEBUG if quiet else logging.INFO,
                "%s %s %s",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1e3, 2),
                },
            )


def api_key_of(headers: Headers) -> str:
    """The key a request presents: ``X-API-Key``, or the token of ``Authorization: Bearer <key>`` (the
    scheme in any case, as RFC 7235 allows), which OpenAI-compatible clients send."""
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    bearer = token.strip() if scheme.lower() == "bearer" else ""
    return (headers.get("x-api-key") or bearer).strip()


def key_digest(headers: Headers) -> str | None:
    """Who presents the request, as far as keys tell: a digest of its API key (never the key), or None."""
    key = api_key_of(headers)
    return hashlib.sha256(key.encode()).hexdigest()[:32] if key else None


class ApiKeyMiddleware:
    """When a key is configured, every path except health, metrics and docs needs ``X-API-Key``
    (or ``Authorization: Bearer <key>``, as OpenAI-compatible clients send it)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if self.api_key is None or scope["type"] != "http" or path in OPEN_EXACT or path.startswith(OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        given = api_key_of(Headers(scope=scope)).encode()
        if not hmac.compare_digest(given, self.api_key):  # constant time
            refused = Unauthorized(
                "missing or wrong API key: send it as `Authorization: Bearer <key>` or `X-API-Key: <key>`",
                headers={"WWW-Authenticate": 'Bearer realm="rtprune-ocr"'},
            )
            request_id = scope.get("state", {}).get("request_id")
            await error_json(refused.status, refused.code, refused.message, request_id, headers=refused.headers)(
                scope, receive, send
            )
            return
        await self.app(scope, receive, send)


RATE_GRACE_S = 10.0  # a body's first seconds are not held to the minimum rate (slow starts, small bodies)


class BodyLimitMiddleware:
    """Refuse bodies over the limit: at once from Content-Length, else while reading (never buffer it all);
    and an upload that stalls (no bytes for ``timeout_s`` while the body is still coming) gets 408."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0, min_rate: int = 0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.min_rate = min_rate  # bytes a second on average, from RATE_GRACE_S after the body began

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None and "transfer-encoding" in headers:
            # two framings: the way request smuggling starts (RFC 9112 6.3): refuse, and close the connection
            message = "Content-Length and Transfer-Encoding together: send one"
            response = error_json(400, "bad_request", message, scope.get("state", {}).get("request_id"))
            response.headers["connection"] = "close"
            await response(scope, receive, send)
            return
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            too_large = UploadTooLarge(self.max_bytes)
            response = error_json(413, too_large.code, too_large.detail, scope.get("state", {}).get("request_id"))
            await response(scope, receive, send)
            return
        received = 0
        body_done = False
        began = time.monotonic()

        async def counting_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # later receives wait for a disconnect: no deadline on those
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                raise UploadStalled(self.timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise UploadTooLarge(self.max_bytes)
                elapsed = time.monotonic() - began
                if not body_done and elapsed > RATE_GRACE_S and received < self.min_rate * elapsed:
                    slow = f"the upload is slower than {self.min_rate:,} bytes a second; send it faster"
                    raise UploadStalled(self.timeout_s, slow)
            return message

        await self.app(scope, counting_receive, send)


class JsonBodyMiddleware:
    """Caps what a JSON body holds beside its images, and decodes its images, before anything parses it.

    FastAPI parses and validates a JSON body on the event loop, at about 40 times its size in memory:
    50 MB of small objects froze every route for half a minute. A data URL is left out of the count (the
    upload limit bounds it); everything else together may be ``max_bytes``. The images' data URLs are
    decoded from the body's bytes (:mod:`service.api.data_urls`), so the route parses a body of handles.
    Both run in a worker thread for a body over ``INLINE_BYTES``."""

    INLINE_BYTES = 64 * 1024  # smaller bodies are measured on the event loop: a thread hop costs more

    def __init__(self, app: ASGIApp, max_bytes: int, max_image_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_image_bytes = max_image_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type = Headers(scope=scope).get("content-type", "") if scope["type"] == "http" else ""
        if "json" not in content_type.split(";", 1)[0].lower():
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nothing to answer
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        chunks.clear()  # the body is held once while the request runs, not twice
        if len(body) > self.INLINE_BYTES:
            prepared = await asyncio.to_thread(self._prepare, body)
        else:
            prepared = self._prepare(body)
        if prepared is None:
            too_large = JsonTooLarge(
                f"the JSON body holds more than {self.max_bytes // 1024} KiB besides its images (data URLs); "
                "send the document as an image or file, not as text"
            )
            request_id = scope.get("state", {}).get("request_id")
            await error_json(413, too_large.code, too_large.message, request_id)(scope, receive, send)
            return
        body, images = prepared
        scope.setdefault("state", {})[STATE_KEY] = images
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _prepare(self, body: bytes) -> tuple[bytes, dict[str, bytes]] | None:
        """The body with its images lifted out, or None when it holds too much beside them."""
        # a body under the cap is under it whatever it holds: only a larger one is measured
        if len(body) > self.max_bytes and json_beside_images(body) > self.max_bytes:
            return None
        return lift_images(body, self.max_image_bytes)


class AdmissionMiddleware:
    """A full page queue answers an upload 503 with Retry-After before a byte of its body is read."""

    def __init__(
        self, app: ASGIApp, *, paths: set[str], full: Callable[[], bool], retry_after_s: Callable[[], int]
    ) -> None:
        self.app = app
        self.paths = paths
        self.full = full
        self.retry_after_s = retry_after_s  # estimated from the queue and how fast pages finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths and self.full():
            answer = overloaded(scope, "the queue is full; retry shortly", self.retry_after_s())
            await answer(scope, receive, send)
            return
        await self.app(scope, receive, send)


class ConcurrencyLimitMiddleware:
    """At most ``limit`` requests in flight (health, metrics and docs exempt, so probes answer under load);
    more get 503 with Retry-After. Idle connections are not requests: the head timeout closes those."""

    def __init__(self, app: ASGIApp, *, limit: int, per_client: int, retry_after_s: int) -> None:
        self.app = app
        self.limit = limit
        self.per_client = per_client
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.by_client: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        client = ClientShares.client_of(scope)
        if self.by_client.get(client, 0) >= self.per_client:  # one client's share: the others keep theirs
            message = f"this client has {self.per_client} requests in flight; retry once one has ended"
            too_many = error_json(
                429,
                "too_many_requests",
                message,
                scope.get("state", {}).get("request_id"),
                headers={"Retry-After": str(self.retry_after_s)},
            )
            await too_many(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            message = f"{self.limit} requests are in flight; retry shortly"
            await overloaded(scope, message, self.retry_after_s)(scope, receive, send)
            return
        self._count(client, +1)
        held = True

        async def sending(message: Message) -> None:
            nonlocal held
            if held and message["type"] == "http.response.start" and _is_event_stream(message):
                held = False  # a stream is counted by the stream limits, not as a request in flight
                self._count(client, -1)
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if held:
                self._count(client, -1)

    def _count(self, client: str, change: int) -> None:
        self.in_flight += change
        self.by_client[client] = self.by_client.get(client, 0) + change
        if not self.by_client[client]:
            del self.by_client[client]


def _is_event_stream(message: Message) -> bool:
    return any(name == b"content-type" and value.startswith(b"text/event-stream") for name, value in message["headers"])


def overloaded(scope: Scope, message: str, retry_after_s: int):
    """The 503 a middleware answers under load, with Retry-After from the settings."""
    request_id = scope.get("state", {}).get("request_id")
    return error_json(503, "overloaded", message, request_id, headers={"Retry-After": str(retry_after_s)})


class ResponseHeadersMiddleware:
    """Add fixed headers to every HTTP response and drop some (a Ray replica names itself in
    ``X-Replica-Id`` and leaves ``X-Request-ID`` to Ray's proxy, which adds the same id again)."""

    def __init__(self, app: ASGIApp, headers: dict[str, str], drop: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.headers = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
        self.drop = {name.lower().encode() for name in drop}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in self.drop]
                message["headers"] = kept + self.headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
