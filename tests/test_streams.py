"""Long-lived streams have limits of their own: one client holding many cannot starve everyone else's
requests, a client's share is bounded, and a stream with nothing to say ends."""

from __future__ import annotations

import contextlib
import time

import httpx
import pytest

from service.api.app import create_app
from service.settings import ServiceSettings
from tests.helpers import FAST, GatedEngine, live_server
from tests.helpers import JOB_PDF as PDF


def started_job(client: httpx.Client, base: str) -> str:
    answer = client.post(f"{base}/v1/jobs", files={"file": ("d.pdf", PDF)}, data=FAST)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def finish(client: httpx.Client, base: str, job: str, gated: GatedEngine) -> None:
    """Cancel the job and open the gate while the service still runs, so no page is left mid-way at exit."""
    client.delete(f"{base}/v1/jobs/{job}")
    gated.gate.set()
    deadline = time.monotonic() + 30
    while client.get(f"{base}/v1/jobs/{job}").json()["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_streams_do_not_count_as_requests_in_flight_and_have_a_share_per_client(tiny_engine, tmp_path):
    gated = GatedEngine(tiny_engine)
    gated.gate.clear()  # jobs stay unfinished: their event streams stay open
    settings = ServiceSettings(
        model="tiny", warmup=False, log_json=False, jobs_dir=tmp_path, max_concurrent_requests=3,
        max_streams=10, max_streams_per_client=3,
    )  # fmt: skip
    app = create_app(settings, load_engine=lambda: gated)
    try:
        with live_server(app) as base, httpx.Client(timeout=30) as client, contextlib.ExitStack() as streams:
            job = started_job(client, base)
            for _ in range(3):  # as many streams as requests may be in flight
                stream = streams.enter_context(client.stream("GET", f"{base}/v1/jobs/{job}/events"))
                assert stream.status_code == 200
            fourth = client.get(f"{base}/v1/jobs/{job}/events")
            assert fourth.status_code == 429 and fourth.json()["error"]["code"] == "too_many_streams"
            assert fourth.headers["retry-after"]
            for _ in range(3):  # the streams hold no request slot: ordinary requests still answer
                assert client.get(f"{base}/v1/jobs/{job}").status_code == 200
            elsewhere = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=30)
            with elsewhere, elsewhere.stream("GET", f"{base}/v1/jobs/{job}/events") as other:
                assert other.status_code == 200  # another address on the loopback: a share of its own
            finish(client, base, job, gated)
    finally:
        gated.gate.set()


def test_a_stream_with_nothing_to_say_ends_after_the_idle_cap(tiny_engine, tmp_path):
    gated = GatedEngine(tiny_engine)
    gated.gate.clear()
    settings = ServiceSettings(model="tiny", warmup=False, log_json=False, jobs_dir=tmp_path, stream_idle_s=1.0)
    app = create_app(settings, load_engine=lambda: gated)
    try:
        with live_server(app) as base, httpx.Client(timeout=30) as client:
            job = started_job(client, base)
            with client.stream("GET", f"{base}/v1/jobs/{job}/events") as stream:
                text = "".join(stream.iter_text())
            assert "event: idle" in text  # the stream ended by itself
            finish(client, base, job, gated)
    finally:
        gated.gate.set()


def test_a_client_is_its_address_whatever_key_it_presents():
    """One key is shared by the service's users (and without one, any key can be invented): keys say
    nothing about who holds the streams."""
    from service.api.shares import StreamLimits

    def scope(address: str, key: str | None) -> dict:
        headers = [(b"x-api-key", key.encode())] if key else []
        return {"type": "http", "client": (address, 5000), "headers": headers}

    limits = StreamLimits(total=10, per_client=2, retry_after_s=1)
    assert limits.acquire(scope("10.0.0.1", "a")) == limits.acquire(scope("10.0.0.1", "b")) == "address:10.0.0.1"
    with pytest.raises(Exception, match="2 open streams"):
        limits.acquire(scope("10.0.0.1", "c"))
    assert limits.acquire(scope("10.0.0.2", "a")) == "address:10.0.0.2"
