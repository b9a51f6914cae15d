"""Shares of a shared resource per client (streams, image fetches), so that one client holding much of it
cannot starve every other. A client is its address (see :meth:`ClientShares.client_of`)."""

from __future__ import annotations

from starlette.types import Scope

from service.errors import Overloaded, ServiceError, TooManyFetches, TooManyStreams


class ClientShares:
    """A shared resource counted per client and in total, so that one client holding much of it cannot
    starve every other. A client is its address: the service has one API key, which its users share (and
    without one, a client may invent any), so a key says nothing about who is asking."""

    what: str  # how the refusals name the units, plural (set by each kind of share)
    refusal: type[ServiceError]  # the 429 past a client's share
    advice = "wait for one to end"

    def __init__(self, *, total: int | None, per_client: int, retry_after_s: int) -> None:
        self.total, self.per_client, self.retry_after_s = total, per_client, retry_after_s
        self.open: dict[str, int] = {}

    def acquire(self, scope: Scope) -> str:
        """Count one more unit of this request's client, or refuse it: 429 past the client's share, 503
        past the total (both with Retry-After)."""
        client = self.client_of(scope)
        retry = {"Retry-After": str(self.retry_after_s)}
        if self.open.get(client, 0) >= self.per_client:
            raise self.refusal(f"this client has {self.per_client} {self.what}; {self.advice}", headers=retry)
        if self.total is not None and sum(self.open.values()) >= self.total:
            raise Overloaded(f"{self.total} {self.what} in all; retry shortly", headers=retry)
        self.open[client] = self.open.get(client, 0) + 1
        return client

    def release(self, client: str) -> None:
        self.open[client] -= 1
        if not self.open[client]:
            del self.open[client]

    @staticmethod
    def client_of(scope: Scope) -> str:
        return f"address:{(scope.get('client') or ('-', 0))[0]}"


class StreamLimits(ClientShares):
    """Long-lived streams (job events, streamed chat): per client and in total."""

    what = "open streams"
    advice = "close one first"
    refusal = TooManyStreams


class FetchShares(ClientShares):
    """Image URLs being fetched: the fetch pool has a few threads, and one client's slow servers may hold
    at most half of them (more of its fetches are refused at once, not queued behind its own)."""

    what = "image fetches under way"
    refusal = TooManyFetches
