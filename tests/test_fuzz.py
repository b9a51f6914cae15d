"""Fuzzing the front door: no generated request and no mutated file may cause a server error.

Two parts, both against a real uvicorn on loopback serving the tiny model:

- schema fuzzing: hypothesis strategies from schemathesis, per operation of our own OpenAPI
  document (multipart uploads included: the schema says so). Schemathesis' pytest plugin does
  not run under pytest 9 yet, so the strategies are driven with ``given`` here;
- a mutation corpus: valid PNG, JPEG, WebP, TIFF, BMP, GIF and PDF files made at test time, then
  bit flips, truncations, zeroed runs and spliced copies of their bytes (seeded), sent as uploads and
  inside real chat and Mistral bodies, some with a fault: a field missing or of the wrong type, a
  page string of 500 huge ranges, a malformed or internal URL, a lone surrogate, a loose image part.

CI runs a bounded slice. The full run, ≥ 2,000 cases, is
``RTPRUNE_FUZZ_CASES=2000 RTPRUNE_FUZZ_SCHEMA_CASES=1000 python -m pytest tests/test_fuzz.py``;
the targets are 0 responses ≥ 500, the server alive, and its memory back within 10% after.
"""

from __future__ import annotations

import io
import json
import os
import random
import time

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings

from service.api.app import create_app
from service.settings import ServiceSettings
from tests.helpers import live_server, text_page, text_pdf

SCHEMA_CASES = int(os.environ.get("RTPRUNE_FUZZ_SCHEMA_CASES", "300"))
MUTATION_CASES = int(os.environ.get("RTPRUNE_FUZZ_CASES", "150"))
DEFAULT_EXAMPLES = 25
FAST = {"mode": "tiny", "max_new_tokens": "1"}


def fuzz_operation(operation, base: str, calls: dict[str, int], uploads: list[int]) -> None:
    """Send generated requests for one operation; fail on any 5xx or a malformed error body."""
    path = operation.path

    @given(case=operation.as_strategy())
    @settings(
        max_examples=SCHEMA_CASES if path == "/v1/ocr" else DEFAULT_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(case):
        if path == "/v1/ocr" and isinstance(case.body, dict):
            case.body["max_new_tokens"] = 1  # a generated page that does decode stays quick on CPU
            if "file" in case.body or "document" in case.body:  # a multipart upload or a JSON document
                uploads.append(1)
        response = case.call(base_url=base, timeout=60)
        calls[path] = calls.get(path, 0) + 1
        assert response.status_code < 500, f"{case.method} {path}: {response.status_code} {response.text[:300]}"
        if path == "/v1/ocr" and response.status_code >= 400:
            error = response.json()["error"]
            assert error["code"] and error["message"]

    check()


def service_app(tiny_engine):
    settings = ServiceSettings(model="tiny", log_json=False, request_timeout_s=30, queue_size=64, warmup=False)
    return create_app(settings, load_engine=lambda: tiny_engine)


def test_no_server_error_on_any_generated_input(tiny_engine):
    calls: dict[str, int] = {}
    uploads: list[int] = []
    with live_server(service_app(tiny_engine)) as base:
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {
            "/v1/ocr",
            "/healthz",
            "/readyz",
            "/metrics",
            "/v1/info",
            "/v1/chat/completions",
            "/v1/models",
            "/v1/jobs",
            "/v1/jobs/{job_id}",
            "/v1/jobs/{job_id}/result",
        }
        for operation in operations:
            fuzz_operation(operation, base, calls, uploads)
    assert calls["/v1/ocr"] >= SCHEMA_CASES * 3 // 4, calls  # the cases really ran
    assert len(uploads) >= calls["/v1/ocr"] // 2, "schema fuzzing should reach the upload, not stop at the form"


def seed_files() -> dict[str, bytes]:
    files = {"pdf": text_pdf(2, lines=4)}
    page = text_page((240, 180), lines=3)
    for fmt in ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF"):
        buffer = io.BytesIO()
        page.save(buffer, format=fmt)
        files[fmt.lower()] = buffer.getvalue()
    return files


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One of: flip bytes, truncate, zero a run, splice a copy of a slice elsewhere."""
    out = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif kind == 1:
        out = out[: rng.randrange(1, len(out))]
    elif kind == 2:
        start = rng.randrange(len(out))
        out[start : start + rng.randint(1, 64)] = bytes(min(64, len(out) - start))
    else:
        start = rng.randrange(len(out))
        piece = out[start : start + rng.randint(1, 256)]
        at = rng.randrange(len(out))
        out[at:at] = piece
    return bytes(out)


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_mutated_files_never_cause_a_server_error(tiny_engine):
    rng = random.Random(20261125)
    seeds = seed_files()
    statuses: dict[int, int] = {}
    with live_server(service_app(tiny_engine)) as base, httpx.Client(base_url=base, timeout=60) as client:
        for name, data in seeds.items():  # the originals are fine, and warm every decoder up
            assert client.post("/v1/ocr", files={"file": (name, data)}, data=FAST).status_code == 200, name
        before = rss_mb()
        for i in range(MUTATION_CASES):
            name = list(seeds)[i % len(seeds)]
            data = mutate(seeds[name], rng)
            response = client.post("/v1/ocr", files={"file": (name, data)}, data=FAST)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, f"{name} mutation {i}: {response.status_code} {response.text[:300]}"
        assert client.get("/healthz").status_code == 200
        after = rss_mb()
    print(
        f"\nmutation fuzzing: {MUTATION_CASES} cases, statuses {dict(sorted(statuses.items()))}, "
        f"RSS {before:.0f} -> {after:.0f} MB"
    )
    assert sum(statuses.values()) == MUTATION_CASES
    assert set(statuses) & {413, 415, 422} and 200 in statuses  # both refusals and survivable mutations
    assert after <= before * 1.10 + 20, f"RSS grew from {before:.0f} MB to {after:.0f} MB"


def json_door_body(door: str, data: bytes, rng: random.Random) -> object:
    """A real chat or Mistral body around ``data`` (an image or PDF, maybe mutated), base64 in one of the
    forms clients send, and sometimes one structural fault."""
    import base64

    encoded = rng.choice(
        [
            base64.b64encode(data).decode(),
            base64.urlsafe_b64encode(data).decode(),
            base64.b64encode(data).decode().rstrip("="),
            base64.encodebytes(data).decode(),
        ]
    )
    url = f"data:image/png;base64,{encoded}"
    if door == "chat":
        content = [{"type": "text", "text": "Free OCR."}, {"type": "image_url", "image_url": {"url": url}}]
        body: dict = {"messages": [{"role": "user", "content": content}], "max_tokens": 1, "rtprune": {"mode": "tiny"}}
    else:
        document = {"type": "image_url", "image_url": url} if rng.random() < 0.5 else {
            "type": "document_url",
            "document_url": url.replace("image/png", "application/pdf"),
        }
        body = {"model": "x", "document": document, "max_new_tokens": 1, "rtprune": {"mode": "tiny"}}
    fault = rng.randrange(11)  # 5-7: no fault
    if fault == 8:  # round three's shapes: huge page strings, malformed URLs, lone surrogates, loose parts
        if door == "mistral":
            body["pages"] = rng.choice([",".join(["0-99999"] * 500), [0, 999], "5-2", "0,,1", "٣"])
        else:
            body["messages"][0]["content"][1] = {"type": "image_url", "image_url": url}  # a string, not an object
    elif fault == 9:
        bad = rng.choice(
            ["http://example.com:99999/a.png", "http://[::1/a.png", "http://example.com:abc/", "http://[64:ff9b::7f00:1]/a"]
        )
        if door == "mistral":
            body["document"] = {"type": "image_url", "image_url": bad}
        else:
            body["messages"][0]["content"][1]["image_url"]["url"] = bad
    elif fault == 10:
        body["rtprune"] = {"mode": "tiny", "retention": "\ud800"}
    if fault == 0:
        body.pop(rng.choice(list(body)))
    elif fault == 1:
        body[rng.choice(list(body))] = rng.choice([None, 7, "x", [], {}, -1e308, "a" * 10_000])
    elif fault == 2:
        body["unexpected"] = {"nested": [1, 2, 3]}
    elif fault == 3 and door == "mistral":
        body["pages"] = rng.choice([[], [-1], [10_000], "0-2", [0, 0, 0]])
    elif fault == 4:
        return rng.choice([[], "text", 12, None])  # not an object at all
    return body


def test_mutated_real_bodies_through_chat_mistral_and_jobs_never_cause_a_server_error(tiny_engine):
    rng = random.Random(20261202)
    seeds = seed_files()
    statuses: dict[str, dict[int, int]] = {"chat": {}, "mistral": {}, "jobs": {}}
    cases = max(30, MUTATION_CASES // 3)
    with live_server(service_app(tiny_engine)) as base, httpx.Client(base_url=base, timeout=60) as client:
        for i in range(cases):
            door = ("chat", "mistral", "jobs")[i % 3]
            name = list(seeds)[i % len(seeds)]
            data = seeds[name] if rng.random() < 0.3 else mutate(seeds[name], rng)
            if door == "jobs":
                response = client.post("/v1/jobs", files={"file": (name, data)}, data=FAST)
                if response.status_code == 202:  # a stored job: its status and result must not 5xx either
                    job = response.json()["id"]
                    for _ in range(200):
                        state = client.get(f"/v1/jobs/{job}").json()["state"]
                        if state not in ("queued", "running"):
                            break
                        time.sleep(0.05)
                    assert client.get(f"/v1/jobs/{job}/result").status_code < 500
            else:
                path = "/v1/chat/completions" if door == "chat" else "/v1/ocr"
                body = json.dumps(json_door_body(door, data, rng))  # escapes what UTF-8 cannot hold (\ud800)
                response = client.post(path, content=body, headers={"content-type": "application/json"})
            counts = statuses[door]
            counts[response.status_code] = counts.get(response.status_code, 0) + 1
            assert response.status_code < 500, f"{door} case {i}: {response.status_code} {response.text[:300]}"
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["code"] and error["message"] and "\n" not in error["message"]
        assert client.get("/healthz").status_code == 200
    print(f"\nreal-body fuzzing: {cases} cases, statuses {statuses}")
    for door, counts in statuses.items():
        assert sum(counts.values()) >= cases // 3 - 1, door
        assert any(code < 300 for code in counts) and any(code >= 400 for code in counts), (door, counts)
