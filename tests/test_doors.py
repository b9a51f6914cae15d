"""Four doors and the CLI, one ritual: the same options give the same resolved options, notes and errors
whether they come as a form (/v1/ocr, /v1/jobs), a chat completion, a Mistral OCR body or CLI flags;
and the same failure gives the same code and message on every door, streamed or not."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from service.errors import INTERNAL_MESSAGE
from tests.helpers import GatedEngine, client_for, png_bytes, text_page
from tests.helpers import wait_until_ready as wait_ready

PAGE = png_bytes(text_page((640, 480), lines=6))
DATA_URL = "data:image/png;base64," + base64.b64encode(PAGE).decode()
KNOBS = {"mode": "tiny", "pruner": "none", "retention": 0.5, "max_crops": 4}  # two of them have no effect
NOTES = {
    "retention is ignored with pruner=none: every visual token is kept",
    "max_crops is ignored in mode 'tiny': only gundam cuts the page into tiles",
}


def form(knobs: dict, tokens: int) -> dict:
    return {**{k: str(v) for k, v in knobs.items()}, "max_new_tokens": str(tokens)}


def chat_body(knobs: dict, tokens: int, **extra) -> dict:
    content = [{"type": "text", "text": "Free OCR."}, {"type": "image_url", "image_url": {"url": DATA_URL}}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": tokens, "rtprune": knobs, **extra}


def mistral_body(knobs: dict, tokens: int) -> dict:
    document = {"type": "image_url", "image_url": DATA_URL}
    return {"model": "x", "document": document, "max_new_tokens": tokens, "rtprune": knobs}


def job_result(client, created) -> dict:
    assert created.status_code == 202, created.text
    job = created.json()
    deadline = time.monotonic() + 60
    while (state := client.get(f"/v1/jobs/{job['id']}").json()["state"]) in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return {"created": job, "state": state, "status": client.get(f"/v1/jobs/{job['id']}").json()}


def cli(preset_cache, tmp_path, *flags: str) -> subprocess.CompletedProcess:
    page = tmp_path / "page.png"
    page.write_bytes(PAGE)
    env = {**os.environ, "RTPRUNE_CACHE_DIR": str(preset_cache)}
    command = [sys.executable, "-m", "service.cli", "ocr", str(page), "--model", "tiny", "--json", *flags]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def doors(tiny_engine):
    gated = GatedEngine(tiny_engine)
    with client_for(gated) as (client, _):
        yield client, gated


def test_the_same_options_resolve_to_the_same_options_and_notes_through_every_door(doors, preset_cache, tmp_path):
    client, _ = doors
    ocr = client.post("/v1/ocr", files={"file": ("p.png", PAGE)}, data=form(KNOBS, 3)).json()
    chat = client.post("/v1/chat/completions", json=chat_body(KNOBS, 3)).json()
    mistral = client.post("/v1/ocr", json=mistral_body(KNOBS, 3)).json()
    job = job_result(client, client.post("/v1/jobs", files={"file": ("p.png", PAGE)}, data=form(KNOBS, 3)))
    result = client.get(f"/v1/jobs/{job['created']['id']}/result").json()
    flags = ["--mode", "tiny", "--pruner", "none", "--retention", "0.5", "--max-crops", "4", "--max-new-tokens", "3"]
    run = cli(preset_cache, tmp_path, *flags)
    assert run.returncode == 0, run.stderr
    stats = {
        "form": ocr["pages"][0]["stats"],
        "chat": chat["rtprune"],
        "mistral": mistral["rtprune"]["pages"][0],
        "job": result["pages"][0]["stats"],
        "cli": json.loads(run.stdout.splitlines()[0])["stats"],
    }
    for door, page in stats.items():  # the options the page ran with, as its statistics show them
        assert page["retention_requested"]["value"] == 0.5, door
        assert page["visual_tokens"] == 73 and page["visual_tokens_kept"] == 73, door  # tiny mode, nothing pruned
        assert page["output_tokens"] == 3, door
    assert (ocr["mode"], ocr["pruner"], ocr["retention"]) == (result["mode"], result["pruner"], result["retention"])
    assert (ocr["mode"], ocr["pruner"], ocr["retention"]) == ("tiny", "none", 0.5)
    notes = {
        "form": set(ocr["warnings"]) & NOTES,
        "chat": set(chat["warnings"]) & NOTES,
        "mistral": set(mistral["rtprune"]["warnings"]) & NOTES,
        "job": set(job["created"]["warnings"]),
        "cli": {line.removeprefix("warning: ") for line in run.stderr.splitlines()} & NOTES,
    }
    assert all(found == NOTES for found in notes.values()), notes
    answers = {"form": ocr["warnings"], "chat": chat["warnings"], "mistral": mistral["rtprune"]["warnings"]}
    answers["job"] = result["warnings"]
    for door, warnings in answers.items():  # what every answer says of its model and its pages, in the same words
        assert any("has RANDOM weights" in w for w in warnings), (door, warnings)
        assert "page 1 stopped at max_new_tokens (3) or the position limit" in warnings, (door, warnings)


@pytest.mark.parametrize(
    ("knobs", "problem"),
    [
        ({"retention": 1.5}, "must be a number in (0, 1] or 'auto'; got 1.5"),
        ({"mode": "huge"}, "should be 'tiny', 'small', 'base', 'large' or 'gundam'"),
    ],
)
def test_the_same_invalid_option_is_the_same_one_line_422_on_every_door(doors, preset_cache, tmp_path, knobs, problem):
    """One sentence on every door; the chat door answers 400, as OpenAI does, the others 422."""
    client, _ = doors
    answers = {
        "form": client.post("/v1/ocr", files={"file": ("p.png", PAGE)}, data=form(knobs, 3)),
        "chat": client.post("/v1/chat/completions", json=chat_body(knobs, 3)),
        "mistral": client.post("/v1/ocr", json=mistral_body(knobs, 3)),
        "jobs": client.post("/v1/jobs", files={"file": ("p.png", PAGE)}, data=form(knobs, 3)),
    }
    (field,) = knobs
    for door, answer in answers.items():
        assert answer.status_code == (400 if door == "chat" else 422), (door, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "invalid_parameter", door
        where, _, message = error["message"].partition(" ")  # one sentence: the field, then the problem
        assert message == problem and "\n" not in error["message"], (door, error["message"])
        assert field in where.split("."), (door, where)  # `retention`, or `rtprune.retention` in JSON
        assert error["param"].split(".")[-1] == field, door  # `rtprune.retention` in JSON
    run = cli(preset_cache, tmp_path, f"--{field}", str(knobs[field]))
    assert run.returncode == 2 and problem in run.stderr and len(run.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("fault", "status", "code", "message"),
    [
        (RuntimeError("secret internal detail"), 500, "internal_error", INTERNAL_MESSAGE),
        (torch.OutOfMemoryError("CUDA out of memory"), 503, "out_of_memory", "the device ran out of memory"),
    ],
)
def test_the_same_failure_gives_the_same_code_and_message_on_every_door(doors, fault, status, code, message):
    client, gated = doors
    wait_ready(client)
    seen = {}

    gated.fail_next = fault
    answer = client.post("/v1/ocr", files={"file": ("p.png", PAGE)}, data=form({"mode": "tiny"}, 3))
    assert answer.status_code == status
    seen["form"] = answer.json()["error"]

    gated.fail_next = fault
    answer = client.post("/v1/chat/completions", json=chat_body({"mode": "tiny"}, 3))
    assert answer.status_code == status
    seen["chat"] = answer.json()["error"]

    gated.fail_next = fault
    with client.stream("POST", "/v1/chat/completions", json=chat_body({"mode": "tiny"}, 3, stream=True)) as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    seen["stream"] = next(event["error"] for event in events if "error" in event)

    gated.fail_next = fault
    job = job_result(client, client.post("/v1/jobs", files={"file": ("p.png", PAGE)}, data=form({"mode": "tiny"}, 3)))
    assert job["state"] == "failed"
    seen["job"] = {"message": job["status"]["error"]}  # a job's status carries the message (no code field)

    for door, error in seen.items():
        assert error.get("code", code) == code and error["message"].startswith(message), (door, error)
        assert "secret" not in error["message"], door
    assert len({error["message"] for error in seen.values()}) == 1, seen
