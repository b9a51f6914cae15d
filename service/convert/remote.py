"""Converting through running services: each document is sent as a job (``POST /v1/jobs``, the form of
``/v1/ocr``) to one of the URLs in turn, its progress read from the job's status, its result fetched
when it is done. A service that is full (503, 429) is waited out as its ``Retry-After`` says."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

FINAL = ("done", "failed", "cancelled")


class RemoteFailure(Exception):
    """The service refused or failed a document: its error code and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class RemoteRunner:
    def __init__(self, urls: list[str], api_key: str | None, form: dict[str, str], poll_s: float = 0.5) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.clients = [httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=600) for url in urls]
        self._next = itertools.cycle(range(len(self.clients)))
        self._lock = threading.Lock()
        self.form, self.poll_s = form, poll_s

    def model(self) -> str:
        """The model the first service runs (all of them should run the same), once it is ready."""
        with _reaching(self.clients[0]):
            info = self.clients[0].get("/v1/info")
        _raise_for(info)
        return info.json()["model"]

    def convert(self, path: Path, on_progress: Callable[[int], None]) -> dict[str, Any]:
        """The service's answer for the document (what ``/v1/ocr`` answers); ``on_progress`` gets the
        number of its pages done so far, as they finish."""
        with self._lock:
            client = self.clients[next(self._next)]
        with _reaching(client):
            return self._follow(client, self._create(client, path), on_progress)

    def _follow(self, client: httpx.Client, job: str, on_progress: Callable[[int], None]) -> dict[str, Any]:
        done = 0
        while True:
            status = client.get(f"/v1/jobs/{job}")
            _raise_for(status)
            state = status.json()
            if state["pages_done"] > done:
                done = state["pages_done"]
                on_progress(done)
            if state["state"] in FINAL:
                break
            time.sleep(self.poll_s)
        result = client.get(f"/v1/jobs/{job}/result")
        _raise_for(result)
        return result.json()

    def _create(self, client: httpx.Client, path: Path) -> str:
        data = path.read_bytes()
        while True:
            answer = client.post("/v1/jobs", files={"file": (path.name, data)}, data=self.form)
            if answer.status_code in (429, 503):  # full for now: wait as the service asks
                time.sleep(float(answer.headers.get("retry-after", "2")))
                continue
            _raise_for(answer)
            return answer.json()["id"]

    def close(self) -> None:
        for client in self.clients:
            client.close()


@contextlib.contextmanager
def _reaching(client: httpx.Client) -> Iterator[None]:
    """A service that cannot be reached (refused, reset, timed out) is a RemoteFailure like any other."""
    try:
        yield
    except httpx.HTTPError as exc:
        raise RemoteFailure("unreachable", f"{client.base_url}: {exc}") from None


def _raise_for(answer: httpx.Response) -> None:
    if answer.is_success:
        return
    try:
        error = answer.json()["error"]
        raise RemoteFailure(error["code"], error["message"])
    except (ValueError, KeyError, TypeError):
        raise RemoteFailure("http_error", f"HTTP {answer.status_code}: {answer.text[:200]}") from None
