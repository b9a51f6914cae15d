"""Scale-out on Ray Serve: a real local Ray cluster started by ``rtprune-ocr serve --replicas 2``,
two tiny replicas behind Ray's proxy; and the deployment's derived options and config files."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

pytest.importorskip("ray.serve", reason='the ray extra is not installed: pip install -e ".[ray]"')

from ray.serve.schema import ServeDeploySchema

from service.api.app import create_app
from service.ray_serve import DEPLOYMENT_NAME, deployment_options, wait_until_loaded
from service.scheduler import Scheduler
from service.settings import ServiceSettings
from tests.helpers import png_bytes, serve_process, text_page, text_pdf
from tests.helpers import wait_until_ready as wait_ready

ROOT = Path(__file__).resolve().parents[1]
PAGE = png_bytes(text_page((600, 800)))
# One page runs per replica and one waits on it (max_ongoing_requests = 2 x batch size); Ray's own
# queue holds two more: small numbers, so overload and a killed replica are quick to reach.
LIMITS = {"max_batch_size": "1", "queue_size": "2", "max_pdf_pages": "2"}


# --- options derived from the settings; the shipped config files ---------------------------------


def options_for(cluster: dict[str, float], **fields) -> dict:
    return deployment_options(ServiceSettings(model="tiny", **fields), cluster)


def test_replica_options_follow_the_batch_the_queue_and_the_cluster():
    on_gpus = options_for({"CPU": 64, "GPU": 8}, replicas=8, max_batch_size=32, queue_size=128, retry_after_s=3)
    assert on_gpus["num_replicas"] == 8 and "autoscaling_config" not in on_gpus
    assert on_gpus["ray_actor_options"] == {"num_cpus": 4.0, "num_gpus": 1.0}  # one GPU and 4 cores for its pages
    assert on_gpus["max_ongoing_requests"] == 64  # a running batch plus the next one, ready to join
    assert on_gpus["max_queued_requests"] == 128
    assert on_gpus["backpressure_config"] == {"status_code": 503, "retry_after_s": 3}

    on_cpus = options_for({"CPU": 16}, replicas=2, max_replicas=4)
    assert on_cpus["ray_actor_options"] == {"num_cpus": 4.0, "num_gpus": 0.0}  # the cores split over max replicas
    assert on_cpus["autoscaling_config"] == {
        "min_replicas": 2,
        "initial_replicas": 2,
        "max_replicas": 4,
        "target_ongoing_requests": 24.0,  # 3/4 of a batch of 32
    }
    assert "num_replicas" not in on_cpus
    assert options_for({"CPU": 16}, replicas=2, threads=3)["ray_actor_options"]["num_cpus"] == 3.0


def test_max_replicas_below_replicas_is_refused():
    with pytest.raises(ValueError, match="max_replicas"):
        ServiceSettings(replicas=4, max_replicas=2)


def test_the_shipped_serve_config_and_rayservice_manifest_pass_rays_own_schema():
    config = yaml.safe_load((ROOT / "docker/ray/serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # what `serve run` / `serve deploy` check
    (application,) = config["applications"]
    assert application["import_path"] == "service.ray_serve:build_app"
    assert application["deployments"][0]["name"] == DEPLOYMENT_NAME
    ServiceSettings(**application["args"])  # the args are service settings

    manifest = yaml.safe_load((ROOT / "docker/ray/rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    assert embedded["applications"][0]["import_path"] == application["import_path"]
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    containers = [c for w in workers for c in w["template"]["spec"]["containers"]]
    assert all(c["resources"]["limits"]["nvidia.com/gpu"] == "1" for c in containers)  # one GPU, one replica


def test_a_replica_is_healthy_only_once_its_model_is_warm():
    class LoadingScheduler:  # the scheduler's state, without a model behind it
        state, error = "loading", None
        loaded = Scheduler.loaded

    async def scenario() -> None:
        scheduler = LoadingScheduler()
        waiting = asyncio.create_task(wait_until_loaded(scheduler))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # Ray routes nothing to a replica whose first health check has not returned
        scheduler.state = "ready"
        await waiting
        scheduler.state, scheduler.error = "failed", "CUDA out of memory"
        with pytest.raises(RuntimeError, match="CUDA out of memory"):  # Ray replaces the replica
            await wait_until_loaded(scheduler)

    asyncio.run(scenario())


# --- a real cluster: two replicas of tiny behind Ray's proxy -------------------------------------


@pytest.fixture(scope="module")
def cluster(preset_cache, tmp_path_factory):
    """``rtprune-ocr serve --replicas 2`` as a user runs it: a local Ray cluster, two tiny replicas."""
    folder = tmp_path_factory.mktemp("ray")
    metrics_port = free_port_run(2)
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in LIMITS.items()]
    args = ["--model", "tiny", "--replicas", "2", "--replica-metrics-port", str(metrics_port), *flags]
    args += ["--random-max-new-tokens", "8192"]  # some tests need pages that run for seconds
    log = folder / "serve.log"
    started = time.monotonic()
    env = {"RAY_DEDUP_LOGS": "0"}  # Ray folds alike log lines of several replicas into one; keep each replica's
    jobs = str(folder / "jobs")
    with serve_process(preset_cache, *args, "--jobs-dir", jobs, log_path=log, env=env) as (base, _, process):
        print(f"Ray Serve ready in {time.monotonic() - started:.1f} s (the proxy routes once one replica is warm)")
        serving_replicas(base)  # and both
        yield {"base": base, "process": process, "metrics_port": metrics_port, "log": log}


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports, below the kernel's ephemeral range.

    A replica serves its metrics on the base port + its rank. Ray's processes bind dozens of ephemeral
    ports as they start (after this check), so a run picked there can be taken by Ray itself; its worker
    ports are 10002-19999, which this range avoids too."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for base in random.sample(range(20000, low - count), 200):
        sockets = [socket.socket() for _ in range(count)]
        try:
            for offset, probe in enumerate(sockets):
                probe.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for probe in sockets:
                probe.close()
    raise RuntimeError("no run of free ports between 20000 and the ephemeral range")


def ocr(base: str, **form) -> httpx.Response:
    data = {"mode": "tiny", "max_new_tokens": "8", **form}
    return httpx.post(f"{base}/v1/ocr", files={"file": ("page.png", PAGE)}, data=data, timeout=120)


def test_both_replicas_serve_and_answer_what_one_process_answers(cluster, tiny_engine):
    answers = [ocr(cluster["base"]) for _ in range(8)]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert len({a.headers["x-replica-id"] for a in answers}) == 2  # Ray spread them over both replicas
    app = create_app(ServiceSettings(model="tiny", log_json=False), load_engine=lambda: tiny_engine)
    with TestClient(app) as client:
        wait_ready(client)
        alone = client.post("/v1/ocr", files={"file": ("page.png", PAGE)}, data={"mode": "tiny", "max_new_tokens": "8"})
    assert {a.json()["pages"][0]["markdown"] for a in answers} == {alone.json()["pages"][0]["markdown"]}
    assert answers[0].json()["pages"][0]["stats"]["visual_tokens"] == alone.json()["pages"][0]["stats"]["visual_tokens"]


def test_bad_input_gets_the_same_4xx_bodies_as_one_process(cluster, tiny_engine):
    def without_ids(response) -> tuple[int, dict]:
        body = response.json()
        body.get("error", {}).pop("request_id", None)
        return response.status_code, body

    cases = [
        {"files": {"file": ("notes.png", b"not an image at all")}},
        {"files": {"file": ("page.png", PAGE)}, "data": {"retention": "1.5"}},
        {"data": {"mode": "tiny"}},  # no file
    ]
    app = create_app(ServiceSettings(model="tiny", log_json=False), load_engine=lambda: tiny_engine)
    with TestClient(app) as client:
        wait_ready(client)
        for case in cases:
            through_ray = httpx.post(f"{cluster['base']}/v1/ocr", timeout=60, **case)
            assert 400 <= through_ray.status_code < 500
            assert without_ids(through_ray) == without_ids(client.post("/v1/ocr", **case))


def test_overload_gets_503_with_retry_after(cluster):
    results: list[httpx.Response] = []

    def send() -> None:
        results.append(ocr(cluster["base"], max_new_tokens="400"))

    threads = [threading.Thread(target=send) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    refused = [r for r in results if r.status_code == 503]
    assert refused, "12 long requests at once fit in 2 replicas x 2 + a queue of 2?"
    assert all(r.headers.get("retry-after") == "2" for r in refused)
    assert {r.status_code for r in results} == {200, 503}


def test_each_replica_serves_its_own_metrics_port(cluster):
    port = cluster["metrics_port"]
    refused = [line for line in cluster["log"].read_text(errors="replace").splitlines() if "not served" in line]
    assert not refused  # the replica's warning (on stderr, which Ray forwards) when its port was taken
    texts = [httpx.get(f"http://127.0.0.1:{p}/metrics", timeout=10).text for p in (port, port + 1)]
    assert all("rtprune_ready 1.0" in text for text in texts)
    lines = [line for text in texts for line in text.splitlines() if line.startswith("rtprune_pages_total")]
    served = sum(float(line.split()[-1]) for line in lines)
    assert served >= 8  # the pages of the tests above, counted by the replicas that ran them


def replica_pid(log: Path, replica_id: str, timeout: float = 15) -> int:
    """The process of a replica, from the log lines Ray forwards: ``(ServeReplica:... pid=N) ... <id> ...``."""
    pattern = re.compile(rf"\(ServeReplica:rtprune-ocr:OCR pid=(\d+)\).* rtprune-ocr_OCR {re.escape(replica_id)} ")
    deadline = time.monotonic() + timeout
    while not (found := pattern.search(log.read_text(errors="replace"))):
        assert time.monotonic() < deadline, f"no log line of replica {replica_id}"
        time.sleep(0.2)
    return int(found.group(1))


def test_a_job_is_answered_by_every_replica_and_outlives_the_one_running_it(cluster):
    """Replicas on a host share the job store: any of them answers a job's status, events and result;
    when the replica running it is killed, a live one adopts it and finishes the pages not stored yet."""
    base = cluster["base"]
    slow = {"mode": "tiny", "max_new_tokens": "300", "ngram_size": "0"}
    created = httpx.post(f"{base}/v1/jobs", files={"file": ("d.pdf", text_pdf(2, lines=3))}, data=slow, timeout=60)
    assert created.status_code == 202, created.text
    job_id, owner = created.json()["id"], created.headers["x-replica-id"]
    answered_by: dict[str, dict] = {}
    deadline = time.monotonic() + 60
    while True:  # wait for the first page, asking both replicas
        status = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=30)
        answered_by[status.headers["x-replica-id"]] = status.json()
        if status.json()["pages_done"] >= 1 and len(answered_by) == 2:
            break
        assert time.monotonic() < deadline and status.json()["pages_done"] < 2, answered_by
        time.sleep(0.1)
    first_page_at = status.json()["pages"][0]["done_at"]
    os.kill(replica_pid(cluster["log"], owner), signal.SIGKILL)
    deadline = time.monotonic() + 120
    while (final := httpx.get(f"{base}/v1/jobs/{job_id}", timeout=30).json())["state"] != "done":
        assert final["state"] in ("queued", "running") and time.monotonic() < deadline, final
        time.sleep(0.2)
    assert final["pages"][0]["done_at"] == first_page_at  # the page finished before the kill was kept
    with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", timeout=30) as events:
        lines = [line for line in events.iter_lines() if line.startswith("event: ")]
    assert lines == ["event: page", "event: page", "event: end"]
    result = httpx.get(f"{base}/v1/jobs/{job_id}/result", timeout=30).json()
    assert [page["page"] for page in result["pages"]] == [1, 2]


def test_killing_a_replica_loses_only_its_own_requests_and_ray_replaces_it(cluster):
    """Six long streams over two replicas that each run one page at a time (the rest wait on the
    replica or in Ray's queue). As soon as a stream is answered, its replica's process is killed with
    SIGKILL: the streams that replica had not finished are cut (never a final ``[DONE]``); every other
    stream — on the other replica, or still in Ray's queue — finishes, and Ray starts a new replica."""
    base = cluster["base"]
    before = serving_replicas(base)  # after the test above, Ray may still be replacing a replica
    pids = {replica: replica_pid(cluster["log"], replica) for replica in before}  # looked up now: the kill is instant
    outcomes: dict[int, dict] = {}

    def stream(index: int) -> None:
        body = {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Free OCR."}, image_part()]}],
            "max_tokens": 1500,  # seconds of decoding
            "stream": True,
            "vllm_xargs": {"ngram_size": 0},
            "rtprune": {"mode": "tiny"},
        }
        outcome = outcomes[index] = {"replica": None, "done": False, "error": None}
        try:
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
                outcome["status"] = response.status_code
                outcome["replica"] = response.headers.get("x-replica-id")
                for line in response.iter_lines():
                    outcome["done"] |= line == "data: [DONE]"
        except httpx.HTTPError as exc:
            outcome["error"] = type(exc).__name__

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    deadline = time.monotonic() + 30
    while not (answered := [o["replica"] for o in outcomes.values() if o["replica"]]):
        assert time.monotonic() < deadline, outcomes
        time.sleep(0.02)
    killed = answered[0]
    os.kill(pids[killed], signal.SIGKILL)
    unfinished = {i for i, o in outcomes.items() if o["replica"] == killed and not o["done"]}
    for thread in threads:
        thread.join(timeout=180)
    print(json.dumps(outcomes, indent=1))
    cut = [i for i, o in outcomes.items() if o["replica"] == killed and i in unfinished]
    others = [o for o in outcomes.values() if o["replica"] != killed]  # the other replica, or queued in Ray
    assert cut and not any(outcomes[i]["done"] for i in cut), outcomes  # cut, never a silent partial success
    assert others and all(o["done"] for o in others), outcomes  # no other accepted request is lost
    assert serving_replicas(base) - before  # Ray started a new replica in place of the killed one
    assert cluster["process"].poll() is None  # the service itself kept running


def serving_replicas(base: str, timeout: float = 90) -> set[str]:
    """The ids of two replicas answering requests, once Ray has two running."""
    deadline = time.monotonic() + timeout
    while len(seen := {ocr(base).headers["x-replica-id"] for _ in range(6)}) < 2:
        assert time.monotonic() < deadline, f"only {seen} answered for {timeout} s"
        time.sleep(1)
    return seen


def image_part() -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PAGE).decode()}}
