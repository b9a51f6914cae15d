"""Connection hygiene for a public server: a header-read timeout, enough file descriptors, and a cap on
connections below them.

uvicorn closes idle keep-alive connections, but a connection that opens and never finishes a
request head (a slowloris, a half-open socket) is kept for ever, and with the default limit of
1,024 open files about a thousand of them starve every other request, health checks included.
Connections past the cap (the open-file limit less a reserve for the model's files, uploads and
outbound requests) are closed as they arrive, and that is logged once a second, not once a socket.
"""

from __future__ import annotations

import errno
import logging
import resource
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_OPEN_FILES = 65_536
RESERVED_FILES = 128  # descriptors kept for everything but client connections (weights, uploads, fetches)
log = logging.getLogger(__name__)


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head has not fully arrived
    ``head_timeout`` seconds after it opened or after its previous response."""

    head_timeout: float = 10.0
    max_connections: int | None = None
    open_connections: int = 0  # of this class: every connection the server holds
    _refusals = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        cls = type(self)
        if cls.max_connections is not None and cls.open_connections >= cls.max_connections:
            transport.close()  # its descriptor goes back at once; the server keeps answering the others
            if cls._refusals is None:
                cls._refusals = OncePerSecond(log)
            message = "%d connections are open (the cap below the open-file limit); closing new ones"
            cls._refusals.warning(message, cls.open_connections)
            self._head_timer = None
            return
        cls.open_connections += 1
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.head_timeout, self._close_if_no_head)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout, self._close_if_no_head)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is None:  # refused at the door: uvicorn never saw it
            return
        type(self).open_connections -= 1
        self._head_timer.cancel()
        super().connection_lost(exc)

    def _close_if_no_head(self) -> None:
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()


def protocol_with_head_timeout(seconds: float, max_connections: int | None = None) -> type[HeadTimeoutProtocol]:
    """The protocol class for one server: its head timeout, its connection cap and its own count."""
    attributes = {"head_timeout": seconds, "max_connections": max_connections, "open_connections": 0}
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), attributes)


def connection_cap(open_files: int) -> int:
    """Client connections a server may hold with ``open_files`` descriptors."""
    return max(16, open_files - RESERVED_FILES)


class OncePerSecond:
    """Log a recurring condition at most once a second, saying how often it happened meanwhile."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger, self.last, self.skipped = logger, 0.0, 0

    def warning(self, message: str, *args) -> None:
        now = time.monotonic()
        if now - self.last < 1.0:
            self.skipped += 1
            return
        suffix = f" ({self.skipped} more in the last second)" if self.skipped else ""
        self.logger.warning(message + suffix, *args)
        self.last, self.skipped = now, 0


class EveryFileLimitOnceASecond(logging.Filter):
    """asyncio logs every failed accept when descriptors run out ("Too many open files"); let one a second
    through."""

    def __init__(self) -> None:
        super().__init__()
        self.last = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        out_of_files = isinstance(error, OSError) and error.errno == errno.EMFILE
        if not out_of_files and "Too many open files" not in str(record.msg):
            return True
        now = time.monotonic()
        if now - self.last < 1.0:
            return False
        self.last = now
        return True


def raise_open_file_limit(wanted: int = DEFAULT_OPEN_FILES) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (never above the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft
