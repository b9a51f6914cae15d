"""URLs a client names (image fetches, webhooks) cannot reach into the service's network, hold its threads or
map its ports. Every listener here runs on 127.0.0.1 and counts who connected."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest

from service.inputs import FETCH_FAILED
from service.jobs.webhooks import Webhooks
from service.outbound import Policy
from tests.helpers import client_for, png_bytes, text_page, wait_until

PNG = png_bytes(text_page((400, 300), lines=3))


@contextmanager
def listener(reply, host: str = "127.0.0.1"):
    """A TCP server on ``host`` that answers each connection with ``reply(connection)``; yields (port, count)."""
    server = socket.socket()
    server.bind((host, 0))
    server.listen(16)
    server.settimeout(0.2)
    contacts: list[float] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            contacts.append(time.monotonic())
            with connection:
                connection.settimeout(5)
                try:
                    connection.recv(65536)
                    reply(connection)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], contacts
    finally:
        stop.set()
        thread.join(2)
        server.close()


def http_reply(status: str, body: bytes = b"", headers: str = ""):
    def reply(connection):
        head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}Connection: close\r\n\r\n"
        connection.sendall(head.encode() + body)

    return reply


def chat(client, url: str):
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Free OCR."}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2, "rtprune": {"mode": "tiny"}}
    return client.post("/v1/chat/completions", json=body)


@pytest.fixture(scope="module")
def fetching(tiny_engine):
    with client_for(tiny_engine, allow_url_fetch=True, fetch_timeout_s=1.5) as (client, _):
        yield client


def test_internal_addresses_in_every_notation_are_refused_and_never_contacted(fetching):
    with listener(http_reply("200 OK", PNG, "Content-Type: image/png\r\n")) as (port, contacts):
        hosts = ("127.0.0.1", "localhost", "0.0.0.0", "2130706433", "127.1", "0x7f.0.0.1", "[::1]")
        hosts += ("[::ffff:127.0.0.1]",)
        for host in hosts:
            answer = chat(fetching, f"http://{host}:{port}/page.png")
            assert answer.status_code == 400, (host, answer.text)  # 422 elsewhere; the chat door answers as OpenAI
            assert answer.json()["error"]["message"] == FETCH_FAILED, host
        assert contacts == []


def test_every_fetch_failure_reads_the_same_so_ports_cannot_be_mapped(tiny_engine):
    allowed = {"allow_url_fetch": True, "fetch_timeout_s": 1.5, "outbound_allow_networks": "127.0.0.0/8"}
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    with (
        client_for(tiny_engine, **allowed) as (client, _),
        listener(http_reply("404 Not Found")) as (missing, _),
        listener(lambda c: c.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")) as (not_http, _),
        listener(http_reply("200 OK", PNG)) as (good, _),
    ):
        messages = {
            chat(client, f"http://127.0.0.1:{port}/x").json()["error"]["message"]
            for port in (closed_port, missing, not_http)
        }
        assert messages == {FETCH_FAILED}  # refused, 404 and a non-HTTP service: one sentence, one status
        assert chat(client, f"http://127.0.0.1:{good}/page.png").status_code == 200  # an allowed network works


def test_redirects_are_not_followed(tiny_engine):
    allowed = {"allow_url_fetch": True, "outbound_allow_networks": "127.0.0.1/32"}
    with listener(http_reply("200 OK", PNG), host="127.0.0.2") as (inner, inner_contacts):
        redirect = http_reply("302 Found", headers=f"Location: http://127.0.0.2:{inner}/secret.png\r\n")
        with client_for(tiny_engine, **allowed) as (client, _), listener(redirect) as (outer, outer_contacts):
            answer = chat(client, f"http://127.0.0.1:{outer}/page.png")
        assert answer.status_code == 400 and len(outer_contacts) == 1
        assert inner_contacts == []


def test_a_server_that_drips_bytes_is_cut_off_at_the_deadline(tiny_engine):
    def drip(connection):
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000:
            connection.sendall(bytes([byte]))
            time.sleep(0.3)

    allowed = {"allow_url_fetch": True, "fetch_timeout_s": 1.5, "outbound_allow_networks": "127.0.0.1/32"}
    with client_for(tiny_engine, **allowed) as (client, _), listener(drip) as (port, _):
        started = time.monotonic()
        answer = chat(client, f"http://127.0.0.1:{port}/slow.png")
        assert answer.status_code == 400 and time.monotonic() - started < 4  # not 0.3 s a byte for ever


def test_fetches_run_on_their_own_threads_not_the_upload_threads(tiny_engine, monkeypatch):
    import service.outbound as outbound

    threads: list[str] = []
    original = outbound.request

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(outbound, "request", spy)
    allowed = {"allow_url_fetch": True, "outbound_allow_networks": "127.0.0.1/32"}
    with client_for(tiny_engine, **allowed) as (client, _), listener(http_reply("200 OK", PNG)) as (port, _):
        assert chat(client, f"http://127.0.0.1:{port}/page.png").status_code == 200
    assert threads and all(name.startswith("rtprune-fetch") for name in threads)


def test_a_webhook_to_an_internal_address_is_refused_when_the_job_is_made(tiny_engine, tmp_path):
    from tests.helpers import FAST
    from tests.helpers import JOB_PDF as PDF
    from tests.helpers import jobs_client as app_client
    from tests.helpers import wait_until_ready as ready

    with listener(http_reply("204 No Content")) as (port, contacts):
        with app_client(tiny_engine, tmp_path, allow_webhooks=True) as client:
            ready(client)
            for host in ("127.0.0.1", "localhost", "2130706433"):
                url = f"http://{host}:{port}/hook"
                answer = client.post("/v1/jobs", files={"file": ("d.pdf", PDF)}, data={**FAST, "webhook_url": url})
                assert answer.status_code == 422 and "public address" in answer.json()["error"]["message"], host
        assert contacts == []


def test_webhooks_are_signed_and_a_stored_one_stays_silent_once_webhooks_are_off():
    policy = Policy.from_setting(["127.0.0.1/32"])
    with listener(lambda connection: None) as (port, contacts):
        off = Webhooks(enabled=False, policy=policy, secret="s3cret")
        assert off.send(f"http://127.0.0.1:{port}/", "j1", "done") is False
        assert contacts == []
    raw: list[bytes] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve():
        connection, _ = server.accept()
        with connection:
            data = b""
            while b"\r\n\r\n" not in data:
                data += connection.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            fields = dict(line.decode().lower().split(": ", 1) for line in head.split(b"\r\n")[1:])
            while len(body) < int(fields["content-length"]):
                body += connection.recv(65536)
            raw.append(head + b"\r\n\r\n" + body)
            connection.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    on = Webhooks(enabled=True, policy=policy, secret="s3cret")
    assert on.send(f"http://127.0.0.1:{server.getsockname()[1]}/", "j1", "done")
    thread.join(5)
    server.close()
    head, _, body = raw[0].partition(b"\r\n\r\n")
    headers = dict(line.decode().split(": ", 1) for line in head.split(b"\r\n")[1:])
    timestamp = headers["X-RTPrune-Timestamp"]
    expected = hmac.new(b"s3cret", timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert headers["X-RTPrune-Signature"] == f"sha256={expected}"
    assert json.loads(body) == {"id": "j1", "state": "done"}


@pytest.mark.parametrize(
    "address",
    ["64:ff9b::7f00:1", "::127.0.0.1", "::10.0.0.1", "fec0::1", "::ffff:10.0.0.1", "2002:7f00:1::1", "::1"],
)
def test_ipv6_addresses_that_carry_an_internal_ipv4_address_are_refused(address):
    assert not Policy().permits(address)


def test_public_addresses_stay_reachable_in_ipv6_forms_too():
    assert all(Policy().permits(a) for a in ["2001:4860:4860::8888", "64:ff9b::808:808", "8.8.8.8"])


@pytest.mark.parametrize("url", ["http://example.com:99999/p.png", "http://example.com:abc/p.png", "http://[::1/p.png"])
def test_a_malformed_url_is_refused_like_any_other_fetch_never_a_500(url):
    from service.outbound import OutboundRefused, resolve

    with pytest.raises(OutboundRefused):
        resolve(url, Policy())


def test_a_failed_webhook_is_tried_again_with_backoff_on_its_own_threads():
    answers = iter(["500 Internal Server Error", "503 Service Unavailable", "204 No Content"])
    policy = Policy.from_setting(["127.0.0.1/32"])
    with listener(lambda connection: http_reply(next(answers))(connection)) as (port, contacts):
        hooks = Webhooks(enabled=True, policy=policy, secret="s3cret", backoff_s=0.05)
        delivery = hooks.deliver(f"http://127.0.0.1:{port}/", "j1", "done")
        assert delivery.result(timeout=60) is True  # the third try got its 2xx
        assert len(contacts) == 3
    with listener(http_reply("500 Internal Server Error")) as (port, contacts):
        hooks = Webhooks(enabled=True, policy=policy, backoff_s=0.01, attempts=3)
        assert hooks.deliver(f"http://127.0.0.1:{port}/", "j2", "failed").result(timeout=60) is False
        assert len(contacts) == 3  # a bounded number of tries
        hooks.close()


def test_an_answer_shorter_than_it_declared_is_a_failed_fetch_not_a_truncated_image():
    from service.outbound import OutboundRefused, request

    def short(connection):
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n" + b"x" * 10)

    policy = Policy.from_setting(["127.0.0.1/32"])
    with listener(short) as (port, _), pytest.raises(OutboundRefused, match="990 bytes short"):
        request(f"http://127.0.0.1:{port}/p.png", policy, deadline_s=10, max_bytes=10_000)


def test_one_client_holds_at_most_half_of_the_fetch_threads(tiny_engine):
    """Fetches to a server that does not answer hold this client's share (half) of the fetch pool: one more
    is refused at once with 429 and Retry-After, while another client still has its own share."""
    from service.api.app import FETCH_THREADS

    release = threading.Event()

    def hold(connection):
        release.wait(10)
        http_reply("200 OK", PNG)(connection)

    allowed = {"allow_url_fetch": True, "fetch_timeout_s": 10.0, "outbound_allow_networks": "127.0.0.1/32"}
    with client_for(tiny_engine, **allowed) as (client, _), listener(hold) as (port, _):
        shares = client.app.state.fetches
        share = FETCH_THREADS // 2
        held = [threading.Thread(target=chat, args=(client, f"http://127.0.0.1:{port}/{i}.png")) for i in range(share)]
        for thread in held:
            thread.start()
        wait_until(lambda: sum(shares.open.values()) == share, "the client's share of the fetch threads held")
        refused = chat(client, f"http://127.0.0.1:{port}/fifth.png")
        assert refused.status_code == 429 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "too_many_fetches"
        other = {"type": "http", "client": ("10.0.0.9", 5000), "headers": []}
        assert shares.acquire(other) == "address:10.0.0.9"  # another client's share is untouched
        shares.release("address:10.0.0.9")
        release.set()
        for thread in held:
            thread.join()
        assert not shares.open  # every share given back
