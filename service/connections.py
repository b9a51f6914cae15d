"""Connection hygiene for a public server: a header-read timeout and enough file descriptors.

uvicorn closes idle keep-alive connections, but a connection that opens and never finishes a
request head (a slowloris, a half-open socket) is kept for ever, and with the default limit of
1,024 open files about a thousand of them starve every other request, health checks included.
"""

from __future__ import annotations

import resource

from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_OPEN_FILES = 65_536


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head has not fully arrived
    ``head_timeout`` seconds after it opened or after its previous response."""

    head_timeout: float = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.head_timeout, self._close_if_no_head)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout, self._close_if_no_head)

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_timer.cancel()
        super().connection_lost(exc)

    def _close_if_no_head(self) -> None:
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()


def protocol_with_head_timeout(seconds: float) -> type[HeadTimeoutProtocol]:
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"head_timeout": seconds})


def raise_open_file_limit(wanted: int = DEFAULT_OPEN_FILES) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (never above the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft
