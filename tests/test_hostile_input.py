"""Hostile input at the front door: every malformed file is a 4xx, memory stays bounded, the schema is truthful,
and idle or stalled connections cannot starve the server."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import random
import resource
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.settings import ServiceSettings
from tests.helpers import data_url, live_server, serve_process, text_page, text_pdf


def encoded(fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    text_page((300, 200), lines=3).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_with_huge_text_chunk() -> bytes:
    """A valid PNG whose zTXt chunk inflates to 3 MB (past Pillow's 1 MB text-chunk bound)."""
    raw = encoded("PNG")
    data = b"Comment\x00\x00" + zlib.compress(b"x" * 3_000_000)
    chunk = struct.pack(">I", len(data)) + b"zTXt" + data + struct.pack(">I", zlib.crc32(b"zTXt" + data))
    return raw[:33] + chunk + raw[33:]  # right after IHDR


MALFORMED = {
    "png-text-bomb": (png_with_huge_text_chunk(), "PNG", "MAX_TEXT_CHUNK"),
    "png-truncated-pixels": (encoded("PNG")[:300], "PNG", ""),
    "jpeg-truncated-header": (encoded("JPEG")[:120], "JPEG", ""),
    "bmp-depth-0": (encoded("BMP")[:28] + b"\x00\x00" + encoded("BMP")[30:], "BMP", ""),
    "webp-mutated": (encoded("WEBP")[:30] + b"\xff" * 40, "WebP", ""),
    "gif-truncated": (encoded("GIF")[:40], "GIF", ""),
    "tiff-truncated": (encoded("TIFF")[:200], "TIFF", ""),
    "pdf-page-tree-lies": (text_pdf(1, lines=2, claimed=5), "PDF", ""),
}


@pytest.fixture(scope="module")
def client(tiny_engine):
    settings = ServiceSettings(model="tiny", log_json=False, warmup=False, max_document_pixels=100_000_000)
    with TestClient(create_app(settings, load_engine=lambda: tiny_engine)) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.02)
        yield client


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_file_is_a_4xx_that_names_the_format(client, name):
    data, kind, detail = MALFORMED[name]
    response = client.post("/v1/ocr", files={"file": ("upload", data)}, data={"mode": "tiny", "max_new_tokens": "1"})
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    if response.status_code == 422:
        assert error["code"] == "corrupt_file" and kind in error["message"] and detail in error["message"]


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_a_document_over_the_pixel_budget_is_413_before_rendering(client):
    big = text_pdf(12, lines=1, size=(3158, 3158))  # twelve 39.9-megapixel pages in a few KB
    assert len(big) < 10_000
    before = rss_mb()
    response = client.post("/v1/ocr", files={"file": ("big.pdf", big)}, data={"mode": "tiny"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "document_too_large"
    assert rss_mb() - before < 100  # nothing was rendered (one such page alone is 120 MB of pixels)
    narrowed = client.post(
        "/v1/ocr", files={"file": ("big.pdf", big)}, data={"mode": "tiny", "pages": "1-2", "max_new_tokens": "1"}
    )
    assert narrowed.status_code == 200  # a page range under the budget is fine


def test_two_file_parts_are_a_422(client):
    files = [("file", ("a.png", encoded("PNG"))), ("file", ("b.png", encoded("PNG")))]
    response = client.post("/v1/ocr", files=files, data={"mode": "tiny", "max_new_tokens": "1"})
    assert response.status_code == 422 and "one `file` part" in response.json()["error"]["message"]


def test_the_openapi_schema_says_multipart_with_a_binary_file_and_the_limits(client):
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/v1/ocr"]["post"]["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json"}  # the form, and Mistral's JSON shape
    form = spec["components"]["schemas"]["OcrForm"]["properties"]
    assert form["file"]["format"] == "binary"
    number = next(option for option in form["retention"]["anyOf"] if option.get("type") == "number")
    assert number["exclusiveMinimum"] == 0 and number["maximum"] == 1
    assert "pattern" in form["pages"]["anyOf"][0] and "<image>" in form["prompt"]["pattern"]
    assert form["max_new_tokens"]["maximum"] == 8192 and form["max_crops"]["minimum"] == 2


# --- connections ------------------------------------------------------------------------------------


@pytest.fixture
def server(preset_cache):
    """A real `rtprune-ocr serve` process with short connection timeouts."""
    args = ("--model", "tiny", "--device", "cpu", "--no-warmup", "--header-timeout-s", "2", "--body-timeout-s", "1")
    with serve_process(preset_cache, *args) as running:
        yield running


def test_health_answers_while_idle_connections_flood_the_server(server):
    base, port, process = server
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))  # the test itself needs the sockets
    idle = []
    try:
        for _ in range(1100):
            conn = socket.create_connection(("127.0.0.1", port))
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
            idle.append(conn)
        assert httpx.get(f"{base}/healthz", timeout=60).status_code == 200
        assert httpx.get(f"{base}/readyz", timeout=60).status_code == 200
        time.sleep(3)  # past the 2 s head timeout: the server has closed them
        for conn in idle[:20]:
            conn.settimeout(2)
            assert conn.recv(1) == b""
    finally:
        for conn in idle:
            conn.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert process.poll() is None


def test_a_stalled_upload_gets_408(server):
    _, port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(
            b"POST /v1/ocr HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\n"  # then nothing more
        )
        answer = b""
        while b"request_timeout" not in answer and (chunk := conn.recv(4096)):  # head and body may come apart
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer


def test_requests_beyond_the_concurrency_limit_get_503_and_health_still_answers(tiny_engine):
    release = threading.Event()

    class Held:
        def __getattr__(self, name):
            return getattr(tiny_engine, name)

        def prepare(self, tasks):
            release.wait(30)
            return tiny_engine.prepare(tasks)

    settings = ServiceSettings(model="tiny", log_json=False, warmup=False, max_concurrent_requests=1)
    with live_server(create_app(settings, load_engine=Held)) as base:
        files = {"file": ("p.png", encoded("PNG"))}
        data = {"mode": "tiny", "max_new_tokens": "1"}
        first = threading.Thread(target=httpx.post, args=(f"{base}/v1/ocr",), kwargs={"files": files, "data": data})
        first.start()
        time.sleep(0.5)
        refused = httpx.post(f"{base}/v1/ocr", files=files, data=data, timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert httpx.get(f"{base}/healthz").status_code == 200 and httpx.get(f"{base}/metrics").status_code == 200
        release.set()
        first.join(30)


def test_a_corrupt_page_of_an_image_never_reaches_the_model():
    image = Image.open(io.BytesIO(encoded("PNG")[:300]))  # header fine, pixels cut
    from service.inputs import UploadError, open_document

    with pytest.raises(UploadError) as refused:
        open_document(encoded("PNG")[:300])
    assert refused.value.status == 422 and image.size == (300, 200)


def test_an_unhandled_error_is_one_500_logged_once(tiny_engine, monkeypatch, caplog):
    import service.api.ocr as route

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in shaping the response")

    monkeypatch.setattr(route, "build_response", broken)
    settings = ServiceSettings(model="tiny", log_json=False, warmup=False)
    with TestClient(create_app(settings, load_engine=lambda: tiny_engine), raise_server_exceptions=True) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.02)
        caplog.clear()
        response = client.post("/v1/ocr", files={"file": ("p.png", encoded("PNG"))}, data={"mode": "tiny"})
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    assert response.json()["error"]["request_id"] == response.headers["x-request-id"]
    logged = [r for r in caplog.records if r.exc_info and "a bug in shaping" in str(r.exc_info[1])]
    assert len(logged) == 1


def test_a_waiting_image_holds_its_encoded_bytes_not_its_pixels():
    from service.inputs import open_document

    image = Image.new("RGBA", (3000, 2000), (255, 255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    document = open_document(buffer.getvalue())
    assert document._images == [] and document._encoded == buffer.getvalue()  # 24 MB decoded; KBs held
    assert document.pixels == [3000 * 2000]
    assert document.page(0).size == (3000, 2000)  # decoded when the scheduler takes the page


def test_the_queue_refuses_pages_past_its_pixel_budget_with_retry_after():
    from service.engine import OcrOptions
    from service.errors import Overloaded
    from service.inputs import Document
    from service.scheduler import PageQueue, PageRequest

    def request(pixels: int) -> PageRequest:
        return PageRequest(Document([1], pixels=[pixels]), OcrOptions(), deadline=time.monotonic() + 60)

    queue = PageQueue(capacity=100, max_pixels=100_000_000)
    queue.put(request(40_000_000), retry_after_s=3)
    queue.put(request(40_000_000), retry_after_s=3)
    with pytest.raises(Overloaded) as refused:
        queue.put(request(40_000_000), retry_after_s=3)
    assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "3"
    assert "pixels" in refused.value.message and queue.pixels == 80_000_000
    queue.take()
    queue.put(request(40_000_000), retry_after_s=3)  # a page taken gives its pixels back
    alone = PageQueue(capacity=100, max_pixels=1000)
    alone.put(request(40_000_000), retry_after_s=3)  # an empty queue takes any document: it can always run


def test_openapi_lists_the_jobs_upload_as_multipart_and_every_answer_a_route_gives(tiny_engine):
    settings = ServiceSettings(model="tiny", log_json=False, warmup=False)
    schema = create_app(settings, load_engine=lambda: tiny_engine).openapi()
    upload = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert list(upload) == ["multipart/form-data"]  # /docs and generated clients can submit a job
    assert "404" in schema["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]
    assert "400" in schema["paths"]["/v1/chat/completions"]["post"]["responses"]


def test_a_body_that_is_not_json_is_a_400_that_says_so(tiny_engine):
    settings = ServiceSettings(model="tiny", log_json=False, warmup=False)
    with TestClient(create_app(settings, load_engine=lambda: tiny_engine)) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.02)
        for path in ("/v1/chat/completions", "/v1/ocr"):
            answer = client.post(path, content=b"{not json", headers={"Content-Type": "application/json"})
            assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json", path
            assert answer.json()["error"]["message"].startswith("the request body is not valid JSON")


def test_a_multipart_boundary_that_contains_json_is_still_a_form(tiny_engine):
    settings = ServiceSettings(model="tiny", log_json=False, warmup=False)
    with TestClient(create_app(settings, load_engine=lambda: tiny_engine)) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.02)
        boundary = "json-boundary-1234"

        def part(name: str, value: bytes, extra: str = "") -> bytes:
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'
            return head.encode() + value + b"\r\n"

        body = part("file", encoded("PNG"), '; filename="p.png"') + part("mode", b"tiny")
        body += part("max_new_tokens", b"2") + f"--{boundary}--\r\n".encode()
        content_type = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        answer = client.post("/v1/ocr", content=body, headers=content_type)
        assert answer.status_code == 200, answer.text


def test_data_urls_accept_what_browsers_and_base64_tools_emit():
    import base64

    from service.inputs import decode_base64

    data = bytes(range(256)) * 3 + b"x"
    standard = base64.b64encode(data).decode()
    assert decode_base64(standard) == data
    assert decode_base64(base64.encodebytes(data).decode()) == data  # MIME: wrapped at 76 with newlines
    assert decode_base64(standard.rstrip("=")) == data  # unpadded
    assert decode_base64(base64.urlsafe_b64encode(data).decode()) == data  # the URL-safe alphabet
    with pytest.raises(ValueError):
        decode_base64(standard[:10] + "*" + standard[10:])


def test_the_bearer_scheme_is_accepted_in_any_case(tiny_engine):
    settings = ServiceSettings(model="tiny", log_json=False, warmup=False, api_key="k3y")
    with TestClient(create_app(settings, load_engine=lambda: tiny_engine)) as client:
        for header in ("Bearer k3y", "bearer k3y", "BEARER  k3y"):
            assert client.get("/v1/models", headers={"Authorization": header}).status_code == 200, header
        assert client.get("/v1/models", headers={"Authorization": "Basic k3y"}).status_code == 401


@contextlib.contextmanager
def capped_server(max_connections: int) -> Iterator[tuple[int, threading.Event]]:
    """uvicorn with the service's connection protocol and a cap of ``max_connections``, in a thread: its
    port, and an event that /slow requests wait for (so that a test can hold requests under way)."""
    import uvicorn
    from fastapi import FastAPI

    from service.connections import protocol_with_head_timeout
    from service.loadtest import free_port

    app, release = FastAPI(), threading.Event()
    app.get("/ping")(lambda: {"ok": True})
    app.get("/slow")(lambda: {"released": release.wait(60)})
    port = free_port()
    protocol = protocol_with_head_timeout(30, max_connections=max_connections)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, http=protocol))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield port, release
    finally:
        release.set()
        server.should_exit = True
        thread.join(10)


def is_closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(5)  # a close arrives at once; an open connection times out
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


def json_answer(sock: socket.socket) -> bytes:
    """The body of the one small JSON response ``sock`` is sent (its head and body may come apart)."""
    sock.settimeout(30)
    answer = b""
    while not answer.endswith(b"}") and (chunk := sock.recv(4096)):
        answer += chunk
    return answer.partition(b"\r\n\r\n")[2]


def test_at_the_connection_cap_a_new_connection_replaces_the_oldest_idle_one(caplog):
    """A slowloris's idle sockets give way to clients that send a request: the oldest idle one first."""
    import logging

    with capped_server(max_connections=3) as (port, _):
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.2)  # all three accepted
        with caplog.at_level(logging.WARNING, logger="service.connections"):
            assert httpx.get(f"http://127.0.0.1:{port}/ping", timeout=5).json() == {"ok": True}
        assert is_closed_by_server(idle[0])
        idle[1].sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")  # the two younger ones still answer
        idle[2].sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert [json_answer(sock) for sock in idle[1:]] == [b'{"ok":true}'] * 2
        assert any("closing the oldest idle ones" in r.getMessage() for r in caplog.records)
        for sock in idle:
            sock.close()


def test_when_every_connection_has_a_request_under_way_new_ones_are_closed_and_logged_once_a_second(caplog):
    import logging

    with capped_server(max_connections=3) as (port, release):
        busy = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        for sock in busy:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.5)  # the three heads read: three requests under way
        with caplog.at_level(logging.WARNING, logger="service.connections"):
            extra = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
            assert all(is_closed_by_server(sock) for sock in extra)  # at once, not left hanging
        warnings = [r for r in caplog.records if "each with a request under way" in r.getMessage()]
        assert len(warnings) == 1  # five refusals within a second: one line
        release.set()
        assert [json_answer(sock) for sock in busy] == [b'{"released":true}'] * 3  # the requests under way finish
        assert httpx.get(f"http://127.0.0.1:{port}/ping", timeout=5).json() == {"ok": True}
        for sock in [*busy, *extra]:
            sock.close()


def test_health_answers_while_a_reconnecting_slowloris_holds_every_descriptor(preset_cache):
    """1,000 sockets that send half a request head and reconnect as soon as they are closed, against a
    server limited to 1,024 open files (a container's default): every /healthz probe is answered."""
    import selectors

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))  # the attacker needs its sockets
    stop = threading.Event()
    attacks = [0]

    def slowloris(port: int) -> None:
        chooser = selectors.DefaultSelector()

        def attack() -> None:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
                chooser.register(sock, selectors.EVENT_READ)
                attacks[0] += 1
            except OSError:
                pass

        for _ in range(1000):
            attack()
        while not stop.is_set():
            for key, _ in chooser.select(timeout=0.1):
                chooser.unregister(key.fileobj)
                key.fileobj.close()
                attack()  # closed by the server: straight back
            for _ in range(1000 - len(chooser.get_map())):
                attack()
        for key in list(chooser.get_map().values()):
            key.fileobj.close()

    attackers: list[threading.Thread] = []
    limit = ("prlimit", "--nofile=1024:1024", "--")  # the server's own limit: it cannot raise it
    args = ("--model", "tiny", "--device", "cpu", "--no-warmup", "--header-timeout-s", "2")
    try:
        with serve_process(preset_cache, *args, launcher=limit) as (base, port, process):
            attackers.append(threading.Thread(target=slowloris, args=(port,), daemon=True))
            attackers[0].start()
            while attacks[0] < 1000:
                time.sleep(0.05)
            answers = []
            for _ in range(20):  # over several of the attacker's 2 s reconnection rounds
                answers.append(httpx.get(f"{base}/healthz", timeout=30).status_code)
                time.sleep(0.2)
            assert answers == [200] * 20
            assert attacks[0] > 1000  # the server closed the attacker's sockets and it came back
            assert process.poll() is None
    finally:
        stop.set()
        for attacker in attackers:
            attacker.join(30)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_running_out_of_file_descriptors_is_logged_once_a_second():
    import errno
    import logging

    from service.connections import EveryFileLimitOnceASecond

    only = EveryFileLimitOnceASecond()

    def record(error: OSError | None, message: str = "socket.accept() out of system resource") -> logging.LogRecord:
        exc_info = (type(error), error, None) if error else None
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, (), exc_info)

    emfile = OSError(errno.EMFILE, "Too many open files")
    assert [only.filter(record(emfile)) for _ in range(100)].count(True) == 1
    assert only.filter(record(None, "an unrelated error"))  # everything else passes


def test_a_page_range_with_any_whitespace_reads_as_its_numbers():
    """The form's pattern allows whitespace around the numbers (tabs, newlines too: found by schema fuzzing)."""
    from service.api.doors import OcrForm

    def page_range(pages: str):
        return OcrForm.model_construct(pages=pages).page_range()

    assert page_range("2-\t\n\x0b\r\x0c") == (2, None)
    assert page_range(" 3 ") == (3, 3)
    assert page_range("\t1\n-\n4 ") == (1, 4)


def test_a_short_page_string_cannot_ask_for_millions_of_pages(client):
    """Ranges are merged and counted, never expanded: 16 KB of '0-99999' asks for 100,000 pages a range."""
    pdf = data_url(text_pdf(2, lines=2), "application/pdf")
    body = {"document": {"type": "document_url", "document_url": pdf}, "pages": ",".join(["0-99999"] * 2000)}
    refused = client.post("/v1/ocr", json=body)
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "pages"
    message = refused.json()["error"]["message"]  # counted from the merged ranges, never expanded
    assert message == "pages 2, 3, 4, 5, 6 and 99993 more are outside the document's 2 pages (0-based)"
    overlapping = {**body, "pages": "0-1,1,0-1", "rtprune": {"mode": "tiny"}, "max_new_tokens": 2}
    assert [p["index"] for p in client.post("/v1/ocr", json=overlapping).json()["pages"]] == [0, 1]


def test_only_the_pages_asked_for_count_against_the_page_limit(client):
    """The first and last page of a PDF longer than the limit are two pages, as the last one alone is one."""
    limit = client.app.state.settings.max_pdf_pages
    pdf = data_url(text_pdf(limit + 20, lines=1), "application/pdf")
    body = {"document": {"type": "document_url", "document_url": pdf}, "rtprune": {"mode": "tiny"}, "max_new_tokens": 2}
    both_ends = client.post("/v1/ocr", json={**body, "pages": [0, limit + 19]})
    assert both_ends.status_code == 200, both_ends.text
    assert [p["index"] for p in both_ends.json()["pages"]] == [0, limit + 19]
    assert client.post("/v1/ocr", json={**body, "pages": [limit + 19]}).status_code == 200
    every = client.post("/v1/ocr", json=body)  # the whole document is still too long
    assert every.status_code == 413 and every.json()["error"]["code"] == "too_many_pages"


def test_what_a_json_body_holds_besides_its_images_is_capped_before_it_is_parsed(client):
    buffer = io.BytesIO()
    Image.frombytes("RGB", (700, 700), random.Random(0).randbytes(700 * 700 * 3)).save(buffer, format="PNG")
    image = data_url(buffer.getvalue(), "image/png")
    assert len(image) > 1 << 20  # the image alone is over the cap: images do not count
    parts = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Free OCR."}]
    chat = {"messages": [{"role": "user", "content": parts}], "max_tokens": 2, "rtprune": {"mode": "tiny"}}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    for padding in (
        {"tools": [{"type": "function", "function": {"name": "f"}}] * 40_000},  # many small objects
        {"messages": [{"role": "user", "content": parts + [{"type": "text", "text": "x"}] * 60_000}]},
    ):
        refused = client.post("/v1/chat/completions", json={**chat, **padding})
        assert refused.status_code == 413 and refused.json()["error"]["code"] == "json_too_large", refused.text
    escaped = client.post(
        "/v1/chat/completions",
        content=json.dumps(chat).encode().replace(b"/", b"\\/"),  # escaped slashes, as PHP's encoder writes
        headers={"content-type": "application/json"},
    )
    assert escaped.status_code == 200, escaped.text


@pytest.mark.parametrize(
    "encode",
    [
        lambda data: base64.b64encode(data),
        lambda data: base64.b64encode(data).rstrip(b"="),  # unpadded
        lambda data: base64.urlsafe_b64encode(data),  # the URL-safe alphabet
        lambda data: base64.b64encode(data).replace(b"/", b"\\/"),  # escaped slashes, as PHP writes JSON
    ],
    ids=["standard", "unpadded", "url-safe", "escaped-slash"],
)
def test_an_image_data_url_is_decoded_from_the_body_and_other_strings_are_left_alone(encode, monkeypatch):
    from service.api import data_urls
    from service.api.data_urls import lift_images

    monkeypatch.setattr(data_urls, "DECODE_PIECE", 64)  # decoded in many pieces, as a large image is

    data = bytes(range(256)) * 40 + b"xy"
    url = b"data:image/png;base64," + encode(data)
    text = b"data:text/plain;base64," + base64.b64encode(b"a text part that reads like a data URL")
    body = b'{"document": {"type": "image_url", "image_url": "%s"}, "text": "%s"}' % (url, text)
    lifted, images = lift_images(body, max_bytes=1 << 20)
    assert json.loads(lifted) == {"document": {"type": "image_url", "image_url": "body-image:0"}, "text": text.decode()}
    assert images == {"body-image:0": data}
    for left in (  # each answered by the door as before: 422 naming the field, or 413
        b'{"image_url": "data:image/png;base64,AAAA*AAA"}',  # not base64
        b'{"image_url": "data:image/png;base64,AA==AAAA"}',  # padding inside
        b'{"image_url": "data:image/png,rawbytes"}',  # not base64 at all
        b'{"url": "data:image/png;base64,%s"}' % base64.b64encode(bytes(3000)),  # larger than the limit
    ):
        assert lift_images(left, max_bytes=2000) == (left, {})


def test_a_30_mb_data_url_costs_the_service_under_3x_its_size_in_memory(tiny_engine):
    """Decoded from the body's own bytes, a data URL never becomes a str: the peak is the body plus the
    decoded image twice, its pieces and their join (2.5x here; 5.7x when the body was parsed as JSON first)."""
    import tracemalloc

    app = create_app(ServiceSettings(model="tiny", log_json=False, warmup=False), load_engine=lambda: tiny_engine)
    body = json.dumps(
        {
            "model": "ocr",
            "document": {"type": "image_url", "image_url": data_url(random.randbytes(22_500_000), "image/png")},
        }
    ).encode()
    answers: list[dict] = []

    async def one_request() -> None:
        chunks = (body[start : start + 65536] for start in range(0, len(body), 65536))  # as uvicorn hands them on

        async def receive() -> dict:
            chunk = next(chunks, None)
            return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

        async def send(message: dict) -> None:
            answers.append(message)

        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        scope = {"type": "http", "method": "POST", "path": "/v1/ocr", "headers": headers, "query_string": b""}
        await app(scope | {"client": ("127.0.0.1", 1), "server": ("test", 80), "scheme": "http"}, receive, send)

    with TestClient(app) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.02)
        tracemalloc.start()
        try:
            client.portal.call(one_request)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert answers[0]["status"] == 415  # random bytes are no image: read whole, then refused by format
    assert peak < 3 * len(body), f"{peak / len(body):.1f}x the body"


def test_a_large_json_body_is_measured_and_its_images_decoded_off_the_event_loop(client, monkeypatch):
    """The work in proportion to a body's size never runs on the event loop, where it would stall every
    other request (/healthz included) for as long."""
    import asyncio

    from service.api import middleware

    on_loop: list[bool] = []

    def observed(body: bytes, max_bytes: int):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # a worker thread runs no event loop
            on_loop.append(False)
        return lift_images(body, max_bytes)

    lift_images = middleware.lift_images
    monkeypatch.setattr(middleware, "lift_images", observed)
    image = data_url(encoded("PNG") + bytes(200_000), "image/png")  # a PNG with trailing bytes: 270 KB of URL
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}]}
    small = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    client.post("/v1/chat/completions", json={**body, "max_tokens": 1, "rtprune": {"mode": "tiny"}})
    client.post("/v1/chat/completions", json=small)
    assert on_loop == [False, True]  # the large body in a worker thread; a small one costs less than a hop


@pytest.mark.parametrize(
    ("path", "extra", "field"),
    [
        ("/v1/chat/completions", {"user": "u" * 257}, "user"),
        ("/v1/chat/completions", {"tools": [{"type": "function"}] * 129}, "tools"),
        ("/v1/chat/completions", {"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ("/v1/chat/completions", {"stop": ["a"] * 5}, "stop"),
        ("/v1/ocr", {"document_annotation_prompt": "p" * 65_537}, "document_annotation_prompt"),
    ],
)
def test_every_field_is_bounded_and_a_longer_one_is_named(client, path, extra, field):
    image = data_url(encoded("PNG"), "image/png")
    if path == "/v1/ocr":
        body = {"model": "ocr", "document": {"type": "image_url", "image_url": image}, **extra}
    else:
        parts = [{"type": "image_url", "image_url": {"url": image}}]
        body = {"messages": [{"role": "user", "content": parts}], "max_tokens": 1, **extra}
    refused = client.post(path, json=body)
    message = refused.json()["error"]["message"]
    assert refused.status_code in (400, 422) and field in message and "at most" in message, refused.text


def test_a_handle_the_client_writes_itself_is_no_image(client):
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "body-image:0"}}]}]}
    refused = client.post("/v1/chat/completions", json=body)
    assert refused.status_code == 400 and "data URL" in refused.json()["error"]["message"], refused.text


def test_an_image_url_given_as_a_string_is_read_and_a_lone_surrogate_is_a_4xx(client):
    image = data_url(encoded("PNG"), "image/png")
    plain = {"type": "image_url", "image_url": image}  # the URL itself, as vLLM accepts it
    body = {"messages": [{"role": "user", "content": [plain]}], "max_tokens": 2, "rtprune": {"mode": "tiny"}}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    surrogate = json.dumps({**body, "rtprune": {"retention": "@@"}}).replace("@@", "\\ud800")
    refused = client.post("/v1/chat/completions", content=surrogate, headers={"content-type": "application/json"})
    assert refused.status_code == 400 and "not valid Unicode" in refused.json()["error"]["message"]


def test_content_length_with_transfer_encoding_is_refused_and_the_connection_closed(server):
    """`serve`'s own HTTP stack (uvicorn's h11, with the head timeout): the second request must not be read."""
    _, port, _ = server
    smuggled = (
        b"POST /v1/ocr HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(smuggled)
        answer = b""
        while chunk := conn.recv(65536):  # until the server closes the connection
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and answer.count(b"HTTP/1.1 ") == 1, answer[:300]


def test_one_client_has_a_share_of_the_requests_in_flight_and_the_others_keep_theirs(tiny_engine):
    from tests.helpers import GatedEngine

    gated = GatedEngine(tiny_engine)
    gated.gate.clear()  # pages wait: their requests stay in flight
    settings = ServiceSettings(
        model="tiny", log_json=False, warmup=False, max_concurrent_requests=10, max_concurrent_requests_per_client=2
    )
    page = encoded("PNG")
    answers: list[httpx.Response] = []

    def post(address: str) -> None:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=120) as client:
            answers.append(client.post(f"{base}/v1/ocr", files={"file": page}, data={"mode": "tiny"}))

    try:
        with live_server(create_app(settings, load_engine=lambda: gated)) as base:
            holders = [threading.Thread(target=post, args=("127.0.0.1",)) for _ in range(2)]
            for holder in holders:
                holder.start()
            assert gated.started.wait(60)
            while len([t for t in holders if t.is_alive()]) < 2:
                time.sleep(0.01)
            time.sleep(0.5)  # both requests are in flight
            with httpx.Client(timeout=120) as same:
                third = same.post(f"{base}/v1/ocr", files={"file": page}, data={"mode": "tiny"})
            assert third.status_code == 429 and third.headers["retry-after"], third.text
            assert third.json()["error"]["code"] == "too_many_requests"
            other = threading.Thread(target=post, args=("127.0.0.2",))  # another client: still admitted
            other.start()
            gated.gate.set()
            for thread in [*holders, other]:
                thread.join(120)
    finally:
        gated.gate.set()
    assert sorted(a.status_code for a in answers) == [200, 200, 200]


def test_an_upload_slower_than_the_minimum_rate_is_cut_with_408(preset_cache):
    """A byte every two seconds never trips the 30 s body timeout; the minimum rate cuts it."""
    args = ("--model", "tiny", "--device", "cpu", "--no-warmup")
    with serve_process(preset_cache, *args) as (_, port, _), socket.create_connection(("127.0.0.1", port)) as conn:
        head = b"POST /v1/ocr HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        conn.sendall(head + b"Content-Length: 100000\r\n\r\n--b\r\n")
        answer = b""
        for _ in range(60):
            try:
                conn.sendall(b"x")
            except OSError:
                break
            conn.settimeout(2.0)
            try:
                answer += conn.recv(65536)
            except TimeoutError:
                continue
            if answer:
                break
        while b"}" not in answer:  # the rest of the answer's body, which may come in a later segment
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"slower than 1,024 bytes a second" in answer
