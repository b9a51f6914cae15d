"""The HTTP service on the tiny model, through the real app: contract, errors, load behaviour."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from tests.helpers import (
    FAST,
    GatedEngine,
    client_for,
    live_server,
    png_bytes,
    stopped_before_its_budget,
    text_page,
)
from tests.helpers import api_settings as settings
from tests.helpers import wait_until_ready as wait_ready


def pdf_bytes(n_pages: int) -> bytes:
    buffer = io.BytesIO()
    pages = [text_page((612, 792), lines=5) for _ in range(n_pages)]
    pages[0].save(buffer, format="PDF", save_all=True, append_images=pages[1:], resolution=72)
    return buffer.getvalue()


PAGE = png_bytes(text_page((600, 800)))


def post(client, data=None, file: bytes = PAGE, name: str = "page.png", **kwargs):
    return client.post(
        "/v1/ocr", files={"file": (name, file, "application/octet-stream")}, data={**FAST, **(data or {})}, **kwargs
    )


@pytest.fixture(scope="module")
def gated(tiny_engine):
    return GatedEngine(tiny_engine)


@pytest.fixture(scope="module")
def service(gated):
    with client_for(gated) as (client, app):
        yield client, app


def assert_error(response, status: int, code: str):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code and body["error"]["message"]
    return body


# --- contract -----------------------------------------------------------------------------------


def test_response_has_every_field(service):
    client, _ = service
    response = post(client, {"retention": "0.5", "pruner": "rtprune"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert {
        "model",
        "mode",
        "task",
        "pruner",
        "markdown",
        "pages",
        "stats",
        "random_weights",
        "warnings",
        "retention",
    } <= set(body)
    assert body["model"] == "tiny" and body["random_weights"] is True and "RANDOM" in body["warnings"][0]
    page = body["pages"][0]
    assert {"page", "markdown", "text", "boxes", "stats"} <= set(page)
    stats = page["stats"]
    assert stats["visual_tokens"] == 73 and stats["visual_tokens_kept"] < 73
    # one definition of retention: the request's 0.5 is the share of grid tokens kept (newlines are never pruned)
    assert stats["grid_tokens"] == 64 and stats["grid_tokens_kept"] == 32 and stats["retention"] == 0.5
    assert stats["visual_share"] == pytest.approx(stats["visual_tokens_kept"] / 73, abs=1e-5)
    assert stats["retention_requested"]["value"] == 0.5 and stats["output_tokens"] == 4
    stages = {"queue", "preprocess", "vision", "prune", "assemble", "prefill", "decode"}
    assert set(stats["latency_ms"]) == {*stages, "total"}
    assert stats["decode_tokens_per_s"] > 0
    assert body["stats"]["pages"] == 1 and body["stats"]["visual_tokens"] == 73
    assert response.headers["x-request-id"]


def test_auto_retention_reports_the_dynamic_terms(service):
    client, _ = service
    stats = post(client, {"retention": "auto"}).json()["pages"][0]["stats"]
    requested = stats["retention_requested"]
    assert requested["value"] == "auto" and 0 < requested["dynamic"] <= 1
    assert requested["r_sim"] is not None and requested["r_txt"] is not None


@pytest.mark.parametrize("pruner", ["none", "random", "norm", "divprune"])
def test_every_pruner_is_selectable(service, pruner):
    client, _ = service
    body = post(client, {"pruner": pruner, "retention": "0.7"}).json()
    assert body["pruner"] == pruner
    kept = body["pages"][0]["stats"]["visual_tokens_kept"]
    assert kept == 73 if pruner == "none" else kept < 73


def test_pdf_pages_and_page_range(service):
    client, _ = service
    body = post(client, file=pdf_bytes(3), name="doc.pdf", data={"pages": "2-3"}).json()
    assert [p["page"] for p in body["pages"]] == [2, 3]
    assert body["stats"]["pages"] == 2
    assert body["markdown"].count("<--- Page Split --->") == 1


def test_locate_task_and_raw_prompt(service):
    client, _ = service
    assert post(client, {"task": "locate", "ref": "the title"}).status_code == 200
    assert_error(post(client, {"task": "locate"}), 422, "invalid_parameter")
    assert post(client, {"prompt": "<image>\nFree OCR."}).status_code == 200
    assert_error(post(client, {"prompt": "no placeholder"}), 422, "invalid_parameter")


def test_health_ready_info_and_metrics(service):
    client, _ = service
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"status": "ready"}
    info = client.get("/v1/info").json()
    assert info["model"] == "tiny" and info["device"] == "cpu" and info["state"] == "ready"
    assert info["limits"]["queue_size"] == 4 and "rtprune" in info["pruners"]
    post(client)
    text = client.get("/metrics").text
    for name in (
        "rtprune_requests_total",
        "rtprune_stage_seconds_bucket",
        'rtprune_visual_tokens_total{kind="kept",mode="tiny",pruner="rtprune"}',  # by mode and pruner
        'rtprune_pages_total{mode="tiny",pruner="rtprune"}',
        "rtprune_output_tokens_total",
        "rtprune_queue_depth",
        "rtprune_in_flight",
        "rtprune_ready 1.0",
    ):
        assert name in text
    assert 'rtprune_requests_total{status="200"}' in text


def test_openapi_documents_the_form_and_errors(service):
    client, _ = service
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/ocr"]["post"]
    assert {"413", "415", "422", "503", "504"} <= set(operation["responses"])
    assert "OcrResponse" in spec["components"]["schemas"]


# --- bad input ----------------------------------------------------------------------------------


def test_upload_over_the_limit_is_413_while_reading(tiny_engine):
    with client_for(GatedEngine(tiny_engine), max_upload_bytes=64 * 1024) as (client, _):
        assert_error(post(client, file=b"\0" * 200_000), 413, "upload_too_large")

        def chunks():  # no Content-Length: the limit must act on the stream itself
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
            for _ in range(100):
                yield b"\0" * 4096
            yield b"\r\n--b--\r\n"

        response = client.post("/v1/ocr", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert_error(response, 413, "upload_too_large")


def test_decompression_bomb_and_pixel_limit_are_413(service, tiny_engine):
    client, _ = service
    # a 20000 x 20000 PNG (400 Mpx) that compresses to a few hundred KB
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 2_000_000
    assert_error(post(client, file=bomb.getvalue()), 413, "image_too_large")
    with client_for(GatedEngine(tiny_engine), max_image_pixels=100_000) as (small, _):
        assert_error(post(small, file=png_bytes(Image.new("RGB", (400, 300)))), 413, "image_too_large")


def test_pdf_over_the_page_limit_is_413(tiny_engine):
    with client_for(GatedEngine(tiny_engine), max_pdf_pages=2) as (client, _):
        assert_error(post(client, file=pdf_bytes(3), name="doc.pdf"), 413, "too_many_pages")
        assert post(client, file=pdf_bytes(3), name="doc.pdf", data={"pages": "1-2"}).status_code == 200


def test_unsupported_and_corrupt_files(service):
    client, _ = service
    assert_error(post(client, file=b"hello, this is text"), 415, "unsupported_media_type")
    assert_error(post(client, file=PAGE[: len(PAGE) // 2]), 422, "corrupt_file")
    assert_error(post(client, file=b"%PDF-1.7 broken"), 422, "corrupt_file")
    assert_error(post(client, file=b""), 422, "empty_file")
    assert_error(post(client, file=pdf_bytes(1), name="d.pdf", data={"pages": "3"}), 422, "invalid_page_range")


@pytest.mark.parametrize(
    "field,value",
    [
        ("retention", "0"),
        ("retention", "1.01"),
        ("retention", "most"),
        ("max_new_tokens", "0"),
        ("max_new_tokens", "9000"),
        ("mode", "huge"),
        ("pruner", "visionzip"),
        ("ngram_size", "-1"),
        ("max_crops", "12"),
        ("pages", "a-b"),
        ("bogus_field", "1"),
    ],
)
def test_out_of_range_parameters_are_422(service, field, value):
    client, _ = service
    body = assert_error(post(client, {field: value}), 422, "invalid_parameter")
    # each detail keeps location, message and type only: the input is never echoed back
    assert all(set(detail) == {"loc", "msg", "type"} for detail in body["detail"])
    assert all(set(detail) == {"loc", "msg", "type"} for detail in body["error"].get("details", []))


def test_missing_file_is_422(service):
    client, _ = service
    assert_error(client.post("/v1/ocr", data=FAST), 422, "invalid_parameter")


# --- load, readiness, failures --------------------------------------------------------------------


def test_queue_full_is_503_with_retry_after_at_once(tiny_engine):
    engine = GatedEngine(tiny_engine)
    with client_for(engine, queue_size=1, max_pdf_pages=1) as (client, app):
        engine.gate.clear()
        engine.started.clear()
        results = {}

        def send(key):
            results[key] = post(client)

        first = threading.Thread(target=send, args=("running",))
        first.start()
        assert engine.started.wait(10)  # the scheduler holds request 1
        second = threading.Thread(target=send, args=("queued",))
        second.start()
        deadline = time.monotonic() + 120  # liveness on a busy machine, not a speed claim
        while app.state.scheduler.queued_pages < 1:  # request 2 waits in the only slot
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = post(client)
        assert not results  # refused while both others still wait: not after the queue drains
        assert_error(refused, 503, "overloaded")
        assert refused.headers["retry-after"] == "2"
        engine.gate.set()
        first.join(30)
        second.join(30)
        assert results["running"].status_code == 200 and results["queued"].status_code == 200
        assert results["queued"].json()["pages"][0]["stats"]["latency_ms"]["queue"] > 0


def test_not_ready_is_503_until_loaded(tiny_engine):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return tiny_engine

    app = create_app(settings(), load_engine=slow_load)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200  # alive while loading
        assert client.get("/readyz").status_code == 503
        assert_error(post(client), 503, "not_ready")
        release.set()
        wait_ready(client)
        assert post(client).status_code == 200


def test_failed_load_reports_and_calls_on_fatal():
    fatal = []

    def broken():
        raise RuntimeError("weights missing")

    app = create_app(settings(), load_engine=broken, on_fatal=fatal.append)
    with TestClient(app) as client:
        deadline = time.monotonic() + 120  # liveness on a busy machine, not a speed claim
        while not fatal:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "weights missing" in ready.json()["error"]["message"]
        assert "weights missing" in assert_error(post(client), 503, "not_ready")["error"]["message"]


def test_a_failing_request_does_not_take_down_the_service(tiny_engine):
    engine = GatedEngine(tiny_engine)
    with client_for(engine) as (client, _):
        engine.fail_next = RuntimeError("boom")
        body = assert_error(post(client), 500, "internal_error")
        assert "boom" not in body["error"]["message"]  # internals stay in the logs
        engine.fail_next = torch.OutOfMemoryError("CUDA out of memory")
        oom = post(client)
        assert_error(oom, 503, "out_of_memory")
        assert oom.headers["retry-after"]
        assert client.get("/readyz").status_code == 200
        assert post(client).status_code == 200


def test_deadline_is_504_and_cancels_the_generation(tiny_engine):
    engine = GatedEngine(tiny_engine)
    with client_for(engine, request_timeout_s=1.0, random_max_new_tokens=8192) as (client, app):
        response = post(client, {"max_new_tokens": "8192", "ngram_size": "0", "mode": "tiny"})
        assert_error(response, 504, "deadline_exceeded")
        stopped_before_its_budget(app)  # the generation was cancelled, not run to its 8192 tokens


def test_api_key(tiny_engine):
    with client_for(GatedEngine(tiny_engine), api_key="s3cret") as (client, _):
        assert_error(post(client), 401, "unauthorized")
        assert_error(post(client, headers={"X-API-Key": "wrong"}), 401, "unauthorized")
        assert post(client, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        assert client.get("/v1/info").status_code == 401


def test_request_id_is_echoed(service):
    client, _ = service
    response = post(client, headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    bad = post(client, {"retention": "7"}, headers={"X-Request-ID": "abc-123"})
    assert bad.json()["error"]["request_id"] == "abc-123"


def test_client_disconnect_cancels_the_work(tiny_engine):
    """A real uvicorn on loopback: a client that hangs up mid-generation stops the decode."""
    app = create_app(settings(random_max_new_tokens=8192), load_engine=lambda: tiny_engine)
    with live_server(app) as base:
        scheduler = app.state.scheduler
        boundary = "xyz"
        fields = {**FAST, "max_new_tokens": "8192", "ngram_size": "0"}
        body = (
            b"".join(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                for k, v in fields.items()
            )
            + (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="p.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + PAGE
            + f"\r\n--{boundary}--\r\n".encode()
        )
        head = (
            f"POST /v1/ocr HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}"
            f"\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(head + body)
            deadline = time.monotonic() + 120  # liveness on a busy machine, not a speed claim
            while not scheduler.running_pages:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        # the socket is closed: the generation must stop long before its 8192 tokens
        stopped_before_its_budget(app)


def test_concurrent_requests_are_all_served(service):
    import httpx
    from asgi_lifespan import LifespanManager

    async def scenario():
        app = create_app(settings(queue_size=8), load_engine=lambda: service[1].state.scheduler.engine)
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                while (await client.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.05)
                files = {"file": ("p.png", PAGE, "image/png")}
                responses = await asyncio.gather(*[client.post("/v1/ocr", files=files, data=FAST) for _ in range(5)])
        return responses

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 5
    ids = {r.headers["x-request-id"] for r in responses}
    assert len(ids) == 5
