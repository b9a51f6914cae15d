"""Requests this service makes to URLs its clients name (image fetches, job webhooks), made safe.

A client-named URL must never become a way into the network the service sits in (SSRF), nor a way to
hold the service's threads. So every outbound request:

- resolves the host once and connects to that address (no second lookup a DNS answer could change),
  refusing loopback, private, link-local, multicast, reserved and unspecified addresses, in IPv4,
  IPv6 and every notation (``127.1``, ``2130706433``, ``[::ffff:127.0.0.1]``), unless an allow-list
  setting names the network;
- follows no redirect (a redirect could lead anywhere);
- has one deadline for the whole exchange and a size cap, so a server that drips bytes is cut off;
- fails with one exception whose detail is for the logs only: the client learns that it failed, not
  whether a port was closed, a name unknown or a certificate wrong (no port scanner).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class OutboundRefused(Exception):
    """The request was not made or did not succeed; the message is for the logs, never for the client."""


class OutboundTooLarge(OutboundRefused):
    """The answer was larger than the caller's limit (a 413 for an image)."""


NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are an IPv4 address
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # RFC 4291's deprecated ::a.b.c.d


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, NAT64, IPv4-compatible, 6to4, Teredo's client), which
    is where a connection to it ends up: the policy judges that one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64 or (ip in IPV4_COMPATIBLE and int(ip) > 1):  # :: and ::1 are not IPv4 addresses
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


@dataclass(frozen=True)
class Policy:
    """Where the service may connect: public addresses, plus ``allow`` (networks a setting names)."""

    allow: tuple[Network, ...] = ()

    @classmethod
    def from_setting(cls, networks: Iterable[str]) -> Policy:
        return cls(tuple(ipaddress.ip_network(n.strip(), strict=False) for n in networks if n.strip()))

    def permits(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id is not part of the address
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.is_site_local:  # fec0::/10, deprecated but still routed on some networks
                return any(ip in network for network in self.allow)
            ip = embedded_ipv4(ip) or ip
        if any(ip in network for network in self.allow):
            return True
        return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str
    address: str  # the resolved address it connects to


def resolve(url: str, policy: Policy) -> Target:
    """The URL's host resolved once, and checked against ``policy``; OutboundRefused otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)  # a bad port raises here
    except ValueError as exc:  # a port out of range or not a number, an unclosed IPv6 bracket
        raise OutboundRefused(f"not a valid URL: {url[:100]!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OutboundRefused(f"not an http(s) URL: {url[:100]!r}")
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise OutboundRefused(f"cannot resolve {parts.hostname!r}: {exc}") from None
    addresses = [info[4][0] for info in infos]
    refused = [a for a in addresses if not policy.permits(a)]
    if refused or not addresses:  # one internal address among public ones refuses the name
        raise OutboundRefused(f"{parts.hostname!r} resolves to an address that is not allowed: {refused}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, parts.hostname, port, path, addresses[0])


class _Pinned(http.client.HTTPSConnection):
    """HTTPS to a resolved address, with the certificate checked against the URL's host name."""

    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout, context=ssl.create_default_context())
        self._address = target.address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _connection(target: Target, timeout: float) -> http.client.HTTPConnection:
    if target.scheme == "https":
        return _Pinned(target, timeout)
    return http.client.HTTPConnection(target.address, target.port, timeout=timeout)


def request(
    url: str,
    policy: Policy,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    deadline_s: float,
    max_bytes: int,
    accept: range | tuple[int, ...] = (200,),
) -> bytes:
    """The body of an ``accept``-ed answer (200) to ``method url``, within ``deadline_s`` (connect to last byte) and
    ``max_bytes``; OutboundRefused for anything else (refused address, redirect, other status, a reply
    that is not HTTP, too slow, too large)."""
    deadline = time.monotonic() + deadline_s
    target = resolve(url, policy)
    connection = _connection(target, timeout=deadline_s)
    # one deadline for everything after the connection is made: a server that drips its status line or
    # headers a byte at a time is cut off too (a per-read timeout would let it hold the thread for ever)
    watchdog: threading.Timer | None = None
    try:
        connection.connect()
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _cut, args=(connection.sock,))
        watchdog.start()
        connection.request(method, target.path, body=body, headers={"Host": target.host, **(headers or {})})
        response = connection.getresponse()
        if response.status not in accept:
            raise OutboundRefused(f"{target.host} answered {response.status} (redirects are not followed)")
        data = bytearray()
        while len(data) <= max_bytes:
            if time.monotonic() >= deadline:
                raise OutboundRefused(f"{target.host} did not answer within {deadline_s:g} s")
            chunk = response.read1(65536)
            if not chunk:  # the end, unless the deadline cut it or the server declared more than it sent
                if time.monotonic() >= deadline:
                    raise OutboundRefused(f"{target.host} was cut off at the {deadline_s:g} s deadline")
                if response.length:  # bytes still owed by the Content-Length it declared
                    raise OutboundRefused(f"{target.host} closed {response.length:,} bytes short of what it declared")
                return bytes(data)
            data += chunk
        raise OutboundTooLarge(f"{target.host} sent more than {max_bytes:,} bytes")
    except OutboundRefused:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:  # refused, reset, TLS, not HTTP, timeout
        late = " (past the deadline)" if time.monotonic() >= deadline else ""
        raise OutboundRefused(f"{target.host}: {type(exc).__name__}: {exc}{late}") from None
    finally:
        if watchdog is not None:
            watchdog.cancel()
        connection.close()


def _cut(sock: socket.socket) -> None:
    """The deadline passed: end the exchange (a read blocked on it fails at once)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
