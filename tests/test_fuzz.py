"""OpenAPI-driven fuzzing: no generated request may cause a server error.

Hypothesis strategies come from schemathesis per operation of our own OpenAPI document; the
requests go to a real uvicorn on loopback serving the tiny model. (Schemathesis' pytest
plugin does not run under pytest 9 yet, so the strategies are driven with ``given`` here.)
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

from service.api.app import create_app
from service.settings import ServiceSettings
from tests.conftest import live_server

EXAMPLES = {"/v1/ocr": 400}  # the upload route has the inputs; the GET routes take no parameters
DEFAULT_EXAMPLES = 25


def fuzz_operation(operation, base: str, calls: dict[str, int]) -> None:
    """Send generated requests for one operation; fail on any 5xx or a malformed error body."""
    path = operation.path

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES.get(path, DEFAULT_EXAMPLES),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(case):
        if path == "/v1/ocr" and isinstance(case.body, dict):
            case.body["max_new_tokens"] = 2  # a generated page that does decode stays quick on CPU
        response = case.call(base_url=base, timeout=60)
        calls[path] = calls.get(path, 0) + 1
        assert response.status_code < 500, f"{case.method} {path}: {response.status_code} {response.text[:300]}"
        if path == "/v1/ocr" and response.status_code >= 400:
            error = response.json()["error"]
            assert error["code"] and error["message"]

    check()


def test_no_server_error_on_any_generated_input(tiny_engine):
    app = create_app(
        ServiceSettings(model="tiny", log_json=False, request_timeout_s=30, queue_size=4),
        load_engine=lambda: tiny_engine,
    )
    calls: dict[str, int] = {}
    with live_server(app) as base:
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/ocr", "/healthz", "/readyz", "/metrics", "/v1/info"}
        for operation in operations:
            fuzz_operation(operation, base, calls)
    assert calls["/v1/ocr"] >= 300, calls  # a few hundred cases really ran
