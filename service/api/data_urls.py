"""Data URLs in a JSON body, found and decoded from the body's own bytes before anything parses it.

A JSON door's image arrives as a base64 data URL, often tens of MB. Parsed as JSON it becomes a str as
large as the body, and decoding that str copies it twice more (the part after the comma, its ASCII
bytes): 30 MB of body peaked at 5.7 times its size. Decoded here instead, from a ``memoryview`` of the
body, an image costs its decoded bytes only, and the body the route parses shrinks to a handle
(``body-image:N``) that :func:`take` turns back into those bytes. Found with ``bytes.find`` only: a
regular expression took 3.4 s over a 30 MB data URL, holding the GIL, so the event loop stalled as long.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterator

from starlette.types import Scope

HANDLE = "body-image:"  # what a lifted data URL reads as in the body the route parses
STATE_KEY = "body_images"  # scope["state"][STATE_KEY]: handle -> decoded bytes, taken once
IMAGE_KEYS = (b'"url"', b'"image_url"', b'"document_url"')  # the fields the doors read an image from
_URL_SAFE = bytes.maketrans(b"-_", b"+/")
DECODE_PIECE = 1 << 21  # base64 characters decoded in one call (~10 ms): a multiple of 4


def data_url_spans(body: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of each JSON string of ``body`` that is a data URL: it starts ``data:`` and holds no
    escape but an escaped slash. ``body[start:end]`` is the string, quotes included."""
    start = body.find(b'"data:')
    while start != -1:
        end = body.find(b'"', start + 6)
        if end == -1:
            return
        backslash = body.find(b"\\", start, end)
        while backslash != -1 and body[backslash + 1 : backslash + 2] == b"/":
            backslash = body.find(b"\\", backslash + 2, end)
        if backslash == -1:
            yield start, end + 1
            start = body.find(b'"data:', end + 1)
        else:  # another escape: not a data URL (the next one may start inside it)
            start = body.find(b'"data:', start + 1)


def json_beside_images(body: bytes) -> int:
    """Bytes of a JSON body outside its data URLs: what parsing and validating the body costs in
    proportion to (a data URL parses as one string, which the upload limit bounds)."""
    return len(body) - sum(end - start for start, end in data_url_spans(body))


def lift_images(body: bytes, max_bytes: int) -> tuple[bytes, dict[str, bytes]]:
    """``body`` with each image field's data URL replaced by a handle, and the handles' decoded bytes.

    A data URL that is not base64, not valid base64, or larger than ``max_bytes`` decoded stays where it
    is, so the door answers it as it always has (422 naming the field, 413)."""
    pieces: list[bytes] = []
    images: dict[str, bytes] = {}
    done = 0
    for start, end in data_url_spans(body):
        decoded = _decoded(body, start + 1, end - 1, max_bytes) if _is_image_field(body, start) else None
        if decoded is None:
            continue
        handle = f"{HANDLE}{len(images)}"
        images[handle] = decoded
        pieces += [body[done:start], b'"', handle.encode(), b'"']
        done = end
    if not images:
        return body, images
    pieces.append(body[done:])
    return b"".join(pieces), images


def take(scope: Scope, url: str) -> bytes | None:
    """The bytes a handle in ``url`` stands for (once: the request holds them no longer than the door
    needs), or None when ``url`` is not a handle of this request."""
    return scope.get("state", {}).get(STATE_KEY, {}).pop(url, None)


def _is_image_field(body: bytes, start: int) -> bool:
    """Whether the string at ``start`` is the value of one of the doors' image fields."""
    before = body[max(0, start - 64) : start].rstrip()
    return before.endswith(b":") and before[:-1].rstrip().endswith(IMAGE_KEYS)


def _decoded(body: bytes, start: int, end: int, max_bytes: int) -> bytes | None:
    """The bytes of the data URL ``body[start:end]`` as :func:`service.inputs.decode_base64` reads them
    (unpadded, or in the URL-safe alphabet, too), or None. The common case, padded standard base64, is
    decoded from a view of the body without a copy; the others pay one."""
    comma = body.find(b",", start, end)
    if comma == -1 or not body[start:comma].endswith(b";base64"):
        return None
    if (end - comma - 1) * 3 // 4 > max_bytes or body.find(b"=", comma, end - 2) != -1:
        return None  # too large, or padding before the end: the door says which
    payload: bytes | memoryview = memoryview(body)[comma + 1 : end]
    if any(body.find(odd, comma, end) != -1 for odd in (b"\\/", b"-", b"_")):
        payload = bytes(payload).replace(b"\\/", b"/").translate(_URL_SAFE)
    whole = len(payload) - len(payload) % 4
    try:
        parts = [  # a piece at a time: binascii holds the GIL, so one 30 MB call froze the event loop 0.16 s
            binascii.a2b_base64(payload[at : min(at + DECODE_PIECE, whole)], strict_mode=True)
            for at in range(0, whole, DECODE_PIECE)
        ]
        if whole < len(payload):  # unpadded: the last group on its own, padded
            parts.append(binascii.a2b_base64(bytes(payload[whole:]) + b"=" * (-len(payload) % 4), strict_mode=True))
    except binascii.Error:
        return None
    return b"".join(parts)
