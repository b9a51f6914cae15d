"""The JSON body cap measures what a body holds beside its data URLs with ``bytes.find`` (a regular
expression held the GIL for seconds over a large data URL). It must count exactly what the plain
definition counts: a JSON string is a data URL when it starts ``data:`` and holds no escape but ``\\/``."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from service.api.data_urls import json_beside_images

DEFINITION = re.compile(rb'"data:(?:[^"\\]|\\/)*"')  # the definition, slow on large bodies


def by_definition(body: bytes) -> int:
    return len(body) - sum(len(match.group()) for match in DEFINITION.finditer(body))


PIECES = [b'"data:', b'"', b"\\/", b"\\\\", b'\\"', b"\\n", b"AAAA", b"image/png;base64,", b"{", b"}", b",", b":"]


@given(st.lists(st.sampled_from(PIECES), max_size=40))
def test_the_fast_measure_counts_what_the_definition_counts(pieces):
    body = b"".join(pieces)
    assert json_beside_images(body) == by_definition(body)


def test_a_large_data_url_is_left_out_whole():
    body = b'{"document": {"type": "image_url", "image_url": "data:image/png;base64,' + b"A" * 3_000_000 + b'"}}'
    assert json_beside_images(body) == len(b'{"document": {"type": "image_url", "image_url": }}')
    escaped = body.replace(b"AAAA", b"A\\/A", 1000)
    assert json_beside_images(escaped) == json_beside_images(body)
