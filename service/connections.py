"""Connection hygiene for a public server: a header-read timeout, enough file descriptors, and a cap on
connections below them.

uvicorn closes idle keep-alive connections, but a connection that opens and never finishes a
request head (a slowloris, a half-open socket) is kept for ever, and with the default limit of
1,024 open files about a thousand of them starve every other request, health checks included.
At the cap (the open-file limit less a reserve for the model's files, uploads and outbound requests)
a new connection replaces the oldest one still waiting for its request head, or is closed when every
connection has a request under way; that is logged once a second, not once a socket.
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
    ``head_timeout`` seconds after it opened or after its previous response.

    At the cap, a new connection takes the place of the oldest one still waiting for a request head (as
    nginx drains its idle connections when it runs out): a client that sends its request at once gets in
    while a slowloris reconnects a thousand sockets, since it would have to open a cap's worth of them
    in the moment a real request takes to arrive. Only when every connection has a request under way
    is a new one closed at once."""

    head_timeout: float = 10.0
    max_connections: int | None = None
    open_connections: int = 0  # of this class: every connection the server holds
    waiting: dict[HeadTimeoutProtocol, None]  # of this class: connections waiting for a head, oldest first
    _refusals = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        cls = type(self)
        at_cap = cls.max_connections is not None and cls.open_connections >= cls.max_connections
        if at_cap and not cls._make_room():
            transport.close()  # its descriptor goes back at once; the server keeps answering the others
            self._head_timer = None
            return
        cls.open_connections += 1
        super().connection_made(transport)
        cls.waiting[self] = None
        self._head_timer = self.loop.call_later(self.head_timeout, self._close_if_no_head)

    def handle_events(self) -> None:
        super().handle_events()
        if not self._waiting_for_head():
            type(self).waiting.pop(self, None)  # a request under way: not the first to make room

    def on_response_complete(self) -> None:
        super().on_response_complete()
        type(self).waiting[self] = None  # waits for its next head from now: the newest waiting
        self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout, self._close_if_no_head)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is None:  # refused at the door: uvicorn never saw it
            return
        cls = type(self)
        cls.open_connections -= 1
        cls.waiting.pop(self, None)
        self._head_timer.cancel()
        super().connection_lost(exc)

    @classmethod
    def _make_room(cls) -> bool:
        """Close the oldest connection waiting for a request head, if any; whether one was closed."""
        if cls._refusals is None:
            cls._refusals = OncePerSecond(log)
        for connection in cls.waiting:
            if connection._waiting_for_head() and not connection.transport.is_closing():
                del cls.waiting[connection]
                connection.transport.close()  # counted out when its close completes (connection_lost)
                message = "%d connections are open (the cap below the open-file limit); closing the oldest idle ones"
                cls._refusals.warning(message, cls.open_connections)
                return True
        message = "%d connections are open (the cap below the open-file limit), each with a request under way; "
        cls._refusals.warning(message + "closing new ones", cls.open_connections)
        return False

    def _waiting_for_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _close_if_no_head(self) -> None:
        if self._waiting_for_head() and not self.transport.is_closing():
            self.transport.close()


def protocol_with_head_timeout(seconds: float, max_connections: int | None = None) -> type[HeadTimeoutProtocol]:
    """The protocol class for one server: its head timeout, its connection cap and its own count."""
    attributes = {"head_timeout": seconds, "max_connections": max_connections, "open_connections": 0, "waiting": {}}
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
