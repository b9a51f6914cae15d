"""Asynchronous, durable jobs: 202 at once, progress in pages, events, result, cancel, limits, kill -9."""

from __future__ import annotations

import http.server
import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import ServiceSettings
from tests.helpers import FAST, GatedEngine, serve_process, stopped_before_its_budget, text_pdf
from tests.helpers import JOB_PDF as PDF
from tests.helpers import jobs_client as app_client
from tests.helpers import wait_until_ready as ready


def wait_state(get, job_id: str, states=("done", "failed", "cancelled"), timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = get(f"/v1/jobs/{job_id}").json()
        if status["state"] in states:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def test_a_job_answers_202_at_once_and_its_result_equals_v1_ocr(tiny_engine, tmp_path):
    with app_client(tiny_engine, tmp_path) as client:
        ready(client)
        accepted = client.post("/v1/jobs", files={"file": ("d.pdf", PDF)}, data=FAST)
        assert accepted.status_code == 202 and accepted.json()["pages_done"] < 3  # before its pages ran
        job_id = accepted.json()["id"]
        assert accepted.headers["location"] == f"http://testserver/v1/jobs/{job_id}"  # absolute
        assert accepted.json()["pages_total"] == 3
        status = wait_state(client.get, job_id)
        assert status["state"] == "done" and status["pages_done"] == 3
        assert all(page["done_at"] for page in status["pages"])
        result = client.get(f"/v1/jobs/{job_id}/result").json()
        direct = client.post("/v1/ocr", files={"file": ("d.pdf", PDF)}, data=FAST).json()
        assert [p["text"] for p in result["pages"]] == [p["text"] for p in direct["pages"]]
        assert result["stats"]["pages"] == 3 and result["markdown"] == direct["markdown"]
        assert result["random_weights"] and "RANDOM" in result["warnings"][0]
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as events:
            text = "".join(events.iter_text())
        assert text.count("event: page") == 3 and '"state": "done"' in text


def test_unknown_jobs_and_other_keys_jobs_are_404(tiny_engine, tmp_path):
    with app_client(tiny_engine, tmp_path) as client:
        ready(client)
        job_id = client.post("/v1/jobs", files={"file": ("d.pdf", PDF)}, data=FAST, headers={"X-API-Key": "a"}).json()[
            "id"
        ]
        assert client.get(f"/v1/jobs/{job_id}", headers={"X-API-Key": "a"}).status_code == 200
        assert client.get(f"/v1/jobs/{job_id}", headers={"X-API-Key": "b"}).status_code == 404
        assert client.delete(f"/v1/jobs/{job_id}", headers={"Authorization": "Bearer b"}).status_code == 404
        assert client.get("/v1/jobs/does-not-exist").json()["error"]["code"] == "not_found"
        long = client.get("/v1/jobs/" + "x" * 50_000)  # not echoed back whole
        assert long.status_code == 404 and len(long.content) < 1000


def test_cancelling_a_job_stops_its_pages(tiny_engine, tmp_path):
    with app_client(tiny_engine, tmp_path, random_max_new_tokens=8192) as client:
        ready(client)
        long = {"mode": "tiny", "max_new_tokens": "8192", "ngram_size": "0"}
        job_id = client.post("/v1/jobs", files={"file": ("d.pdf", PDF)}, data=long).json()["id"]
        wait_state(client.get, job_id, states=("running",))
        assert client.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"
        stopped_before_its_budget(client.app)  # the cancelled job's pages stopped
        result = client.get(f"/v1/jobs/{job_id}/result")
        assert result.status_code == 409 and result.json()["error"]["code"] == "job_cancelled"


def test_limits_per_key_and_storage(tiny_engine, tmp_path):
    with app_client(tiny_engine, tmp_path / "a", jobs_per_key=1) as client:
        ready(client)
        assert client.post("/v1/jobs", files={"file": ("d.pdf", PDF)}, data=FAST).status_code == 202
        refused = client.post("/v1/jobs", files={"file": ("d.pdf", PDF)}, data=FAST)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_jobs"
    with app_client(tiny_engine, tmp_path / "b", jobs_max_bytes=len(PDF) + 10, jobs_client_share=1.0) as client:
        ready(client)
        assert client.post("/v1/jobs", files={"file": ("d.pdf", PDF)}, data=FAST).status_code == 202
        full = client.post("/v1/jobs", files={"file": ("d.pdf", PDF)}, data=FAST)
        assert full.status_code == 503 and full.headers["retry-after"]


def test_one_client_holds_at_most_its_share_of_the_job_storage_and_delete_frees_it(tiny_engine, tmp_path):
    """Behind one shared key, clients are told apart by address: one that filled its share gets 429 while
    another still gets room, and deleting a job gives the room back at once (not after the retention)."""
    settings = ServiceSettings(
        model="tiny", log_json=False, warmup=False, jobs_dir=tmp_path, random_max_new_tokens=8192,
        jobs_max_bytes=3 * len(PDF), jobs_client_share=0.5,
    )  # fmt: skip
    app = create_app(settings, load_engine=lambda: tiny_engine)

    async def from_address(scope, receive, send):  # the peer address a test header names, as a socket has one
        address = dict(scope.get("headers", [])).get(b"x-test-peer")
        await app({**scope, "client": (address.decode(), 1000)} if address else scope, receive, send)

    slow = {"mode": "tiny", "max_new_tokens": "8192", "ngram_size": "0"}  # still running when the next one comes
    first, second = {"X-Test-Peer": "10.0.0.1"}, {"X-Test-Peer": "10.0.0.2"}
    with TestClient(from_address) as client:
        ready(client)

        def post(peer: dict[str, str]) -> httpx.Response:
            return client.post("/v1/jobs", files={"file": ("d.pdf", PDF)}, data=slow, headers=peer)

        mine = post(first).json()["id"]
        refused = post(first)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "storage_share_used", refused.text
        assert refused.headers["retry-after"]
        other = post(second)
        assert other.status_code == 202, other.text  # the other client keeps its room
        assert client.delete(f"/v1/jobs/{mine}", headers=first).status_code == 200
        again = post(first)
        assert again.status_code == 202, again.text
        for job in (other.json()["id"], again.json()["id"]):
            client.delete(f"/v1/jobs/{job}")


def test_expired_jobs_are_deleted_with_their_files(tiny_engine, tmp_path):
    with app_client(tiny_engine, tmp_path, job_retention_s=0.5) as client:
        ready(client)
        job_id = client.post("/v1/jobs", files={"file": ("d.pdf", PDF)}, data=FAST).json()["id"]
        wait_state(client.get, job_id)
    assert not (tmp_path / "uploads" / job_id).exists()  # an ended job's upload is deleted at once
    time.sleep(0.6)
    with app_client(tiny_engine, tmp_path, job_retention_s=0.5) as client:  # the sweep runs at start
        ready(client)
        deadline = time.monotonic() + 120  # liveness on a busy machine, not a speed claim
        while client.get(f"/v1/jobs/{job_id}").status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_a_webhook_hears_the_end_when_the_server_allows_it(tiny_engine, tmp_path):
    heard: list[dict] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            heard.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{hook.server_address[1]}/done"
    try:
        with app_client(tiny_engine, tmp_path / "off") as client:
            ready(client)
            off = client.post("/v1/jobs", files={"file": ("d.pdf", PDF)}, data={**FAST, "webhook_url": url})
            assert off.status_code == 422 and "webhooks are off" in off.json()["error"]["message"]
        # a receiver on this host is reachable only where the server allows its network (127.0.0.1 here)
        allowed = {"allow_webhooks": True, "outbound_allow_networks": "127.0.0.1/32"}
        with app_client(tiny_engine, tmp_path / "on", **allowed) as client:
            ready(client)
            job_id = client.post("/v1/jobs", files={"file": ("d.pdf", PDF)}, data={**FAST, "webhook_url": url}).json()[
                "id"
            ]
            wait_state(client.get, job_id)
            deadline = time.monotonic() + 120  # liveness on a busy machine, not a speed claim
            while not heard:
                assert time.monotonic() < deadline, "the webhook was not called"
                time.sleep(0.05)
        assert heard == [{"id": job_id, "state": "done"}]
    finally:
        hook.shutdown()


@pytest.mark.slow
def test_a_job_survives_kill_9_and_recomputes_no_finished_page(preset_cache, tmp_path):
    pdf = text_pdf(4, lines=3)
    args = ("--model", "tiny", "--device", "cpu", "--max-batch-size", "1", "--jobs-dir", str(tmp_path / "jobs"))
    slow = {"mode": "tiny", "max_new_tokens": "150", "ngram_size": "0"}
    with serve_process(preset_cache, *args) as (base, _, process):
        job_id = httpx.post(f"{base}/v1/jobs", files={"file": ("d.pdf", pdf)}, data=slow).json()["id"]
        deadline = time.monotonic() + 120
        while True:
            status = httpx.get(f"{base}/v1/jobs/{job_id}").json()
            if 1 <= status["pages_done"] < 4:
                break
            assert status["pages_done"] < 4 and time.monotonic() < deadline, status
            time.sleep(0.02)
        process.kill()  # SIGKILL: no shutdown, no clean-up
        process.wait(10)
    before = {p["page"]: p["done_at"] for p in status["pages"] if p["done_at"]}
    with serve_process(preset_cache, *args) as (base, _, _):
        final = wait_state(lambda path: httpx.get(f"{base}{path}"), job_id)
        result = httpx.get(f"{base}/v1/jobs/{job_id}/result").json()
    assert final["state"] == "done" and final["pages_done"] == 4
    after = {p["page"]: p["done_at"] for p in final["pages"]}
    assert all(after[page] == done_at for page, done_at in before.items())  # finished before the kill: kept as is
    assert [p["page"] for p in result["pages"]] == [1, 2, 3, 4]  # every page exactly once


def test_a_cancelled_job_frees_its_place_in_the_quota(tiny_engine, tmp_path):
    gated = GatedEngine(tiny_engine)
    gated.gate.clear()  # the first job stays unfinished until it is cancelled
    settings = ServiceSettings(model="tiny", log_json=False, warmup=False, jobs_dir=tmp_path, jobs_per_key=1)
    try:
        with TestClient(create_app(settings, load_engine=lambda: gated)) as client:
            ready(client)
            first = client.post("/v1/jobs", files={"file": ("d.pdf", PDF)}, data=FAST)
            assert first.status_code == 202
            refused = client.post("/v1/jobs", files={"file": ("d.pdf", PDF)}, data=FAST)
            assert refused.status_code == 429 and "unfinished" in refused.json()["error"]["message"]
            client.delete(f"/v1/jobs/{first.json()['id']}")
            wait_state(client.get, first.json()["id"])
            gated.gate.set()
            second = client.post("/v1/jobs", files={"file": ("d.pdf", PDF)}, data=FAST)
            assert second.status_code == 202  # the cancelled job holds no slot (it did until it expired)
            wait_state(client.get, second.json()["id"])
    finally:
        gated.gate.set()


def test_a_failed_job_has_its_own_code_and_says_why(tiny_engine, tmp_path):
    gated = GatedEngine(tiny_engine)
    gated.fail_next = RuntimeError("an internal detail")
    settings = ServiceSettings(model="tiny", log_json=False, warmup=False, jobs_dir=tmp_path)
    with TestClient(create_app(settings, load_engine=lambda: gated)) as client:
        ready(client)
        job_id = client.post("/v1/jobs", files={"file": ("p.pdf", text_pdf(1, lines=2))}, data=FAST).json()["id"]
        assert wait_state(client.get, job_id)["state"] == "failed"
        error = client.get(f"/v1/jobs/{job_id}/result").json()["error"]
        assert error["code"] == "job_failed" and error["message"].startswith("the job failed: ")
        assert "an internal detail" not in error["message"]  # the error table hides internals here too


def test_job_events_keep_alive_while_a_page_runs_and_resume_after_last_event_id(tiny_engine, tmp_path):
    """Proxies cut streams silent for a minute: a comment goes out while a page decodes. Page events carry
    ids in the order the pages finished, so a reconnect with Last-Event-ID gets only what it missed."""
    settings = dict(random_max_new_tokens=8192, sse_keepalive_s=0.2)
    with app_client(tiny_engine, tmp_path, **settings) as client:
        ready(client)
        slow = {"mode": "tiny", "max_new_tokens": "120", "ngram_size": "0"}
        job_id = client.post("/v1/jobs", files={"file": ("d.pdf", PDF)}, data=slow).json()["id"]
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as events:
            lines = []
            for line in events.iter_lines():
                lines.append(line)
                if line.startswith("event: page"):
                    break
        assert ": keep-alive" in lines[: lines.index("event: page")], lines  # before the first page finished
        assert lines[lines.index("event: page") - 1] == "id: 1"
        wait_state(client.get, job_id)
        with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "2"}) as events:
            text = "".join(events.iter_text())
        assert text.count("event: page") == 1 and "id: 3\n" in text and '"state": "done"' in text
        bad = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "x"})
        assert bad.status_code == 422 and bad.json()["error"]["param"] is None


def test_a_job_goes_as_batch_unless_it_asks_for_interactive_within_the_quota(tiny_engine, tmp_path, monkeypatch):
    from service.scheduler import Scheduler

    seen: list[tuple[str, str]] = []
    submit = Scheduler.submit
    monkeypatch.setattr(Scheduler, "submit", lambda self, r: (seen.append((r.priority, r.client)), submit(self, r))[1])
    with app_client(tiny_engine, tmp_path, interactive_job_pages=2) as client:
        ready(client)
        refused = client.post("/v1/jobs", files={"file": ("d.pdf", PDF)}, data={**FAST, "priority": "interactive"})
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "priority"
        assert "at most 2 pages" in refused.json()["error"]["message"]
        batch = client.post("/v1/jobs", files={"file": ("d.pdf", PDF)}, data=FAST).json()["id"]
        assert wait_state(client.get, batch)["state"] == "done"
        two = {**FAST, "priority": "interactive", "pages": "1-2"}
        interactive = client.post("/v1/jobs", files={"file": ("d.pdf", PDF)}, data=two).json()["id"]
        assert wait_state(client.get, interactive)["state"] == "done"
        client.post("/v1/ocr", files={"file": ("d.pdf", PDF)}, data=FAST)
    assert [priority for priority, _ in seen] == ["batch", "interactive", "interactive"]
    assert seen[0][1] == "owner:anonymous" and seen[2][1] == "address:testclient"
