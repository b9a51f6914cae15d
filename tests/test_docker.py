"""The shipped Dockerfile and compose file, built and run on a real Docker Engine: what an operator does.

Needs a Docker Engine with Compose v2 and BuildKit (buildx), and debootstrap for the local base image
(`.ci/run` installs and starts them). Skipped, with the reason, only where Docker cannot run at all; in
CI (``CI`` set) a missing engine fails instead. No image registry is reachable here, so the base image
and the PostgreSQL and Prometheus images are local stand-ins made from Debian's packages
(docker/ci/images.sh), swapped in by docker/ci/compose.ci.yml and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import sse_events, text_pdf, wait_until

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILES = ("-f", str(ROOT / "docker/docker-compose.yml"), "-f", str(ROOT / "docker/ci/compose.ci.yml"))
PROJECT = f"rtprune-ci-{os.getpid()}"
DEFAULT_IMAGE = "rtprune-ocr:0.1.0"
SLOW_PAGE = {"mode": "tiny", "max_new_tokens": "200", "ngram_size": "0"}  # seconds a page on a CPU, not minutes

pytestmark = pytest.mark.slow


def sh(*command: str, env: dict | None = None, check: bool = True, timeout: float = 1800) -> str:
    """Run a command; its output, or an assertion error that shows it."""
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
        )
    return done.stdout + done.stderr if not check else done.stdout


def docker_problem() -> str | None:
    """Why Docker cannot run here, in one line; None when it can."""
    for tool, how in (("docker", "docker.io"), ("debootstrap", "debootstrap")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {how})"
    for check, missing in (
        (["docker", "info"], "no Docker Engine answers (start dockerd)"),
        (["docker", "compose", "version"], "Compose v2 is missing (Debian 13's docker-compose package)"),
        (["docker", "buildx", "version"], "BuildKit's buildx is missing (Debian 13's docker-buildx package)"),
    ):
        if subprocess.run(check, capture_output=True).returncode != 0:
            return missing
    return None


class Compose:
    """`docker compose` on the shipped file plus the stand-ins, as one project of this test run."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def __call__(self, *args: str, check: bool = True, env: dict | None = None) -> str:
        return sh(
            "docker", "compose", "-p", PROJECT, *COMPOSE_FILES, *args, env={**self.env, **(env or {})}, check=check
        )

    def container(self, service: str) -> str:
        ids = self("ps", "-q", service).split()
        assert len(ids) == 1, f"{service}: {ids}"
        return ids[0]


def inspect(container: str, template: str) -> str:
    return sh("docker", "inspect", "-f", template, container).strip()


def address(container: str) -> str:
    """The container's own address on its network: the host reaches it directly, no port published."""
    return inspect(container, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")


def wait_healthy(container: str) -> None:
    """Until Docker itself reports the image's or service's HEALTHCHECK healthy (not a probe of ours)."""
    try:
        poll(lambda: inspect(container, "{{.State.Health.Status}}") == "healthy", f"{container} healthy")
    except AssertionError as error:
        log = sh("docker", "logs", "--tail", "30", container, check=False)
        raise AssertionError(f"{error}; its log ends:\n{log}") from None


def poll(condition, what: str) -> None:
    """wait_until at a pace that suits `docker inspect` and containers starting (seconds, not ms)."""
    wait_until(condition, what, patience_s=600, interval_s=0.5)


@pytest.fixture(scope="module")
def compose() -> Iterator[Compose]:
    problem = docker_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"Docker is needed in CI: {problem}")
        pytest.skip(f"needs Docker: {problem}")
    exports = sh("bash", str(ROOT / "docker/ci/images.sh"))
    env = dict(os.environ)
    for line in exports.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = value
    if list((ROOT / "docker/wheels").glob("torch-*.whl")):  # a local CPU wheel: PyTorch's CPU index is not needed
        env.update(RTPRUNE_LOCAL_WHEELS="1", RTPRUNE_TORCH_INDEX_URL="")
    project = Compose(env)
    project("build", "rtprune-ocr", "rtprune-ocr-cpu")
    try:
        yield project
    finally:
        project("--profile", "*", "down", "--volumes", "--remove-orphans", "--timeout", "5", check=False)
        # earlier builds of these tags, left untagged by this run's: only this project's images (its label)
        ours = "label=org.opencontainers.image.title=rtprune-ocr"
        sh("docker", "image", "prune", "-f", "--filter", ours, check=False)


def ocr(base: str, path: str = "docker/samples/letter-page.png", **data: str) -> httpx.Response:
    content = (ROOT / path).read_bytes()
    return httpx.post(f"{base}/v1/ocr", files={"file": (Path(path).name, content)}, data=data, timeout=300)


def test_the_default_image_serves_as_uid_10001_turns_healthy_and_drains_on_stop(compose):
    """`docker run` of the default (GPU) image with `--model tiny` on CPU, as the README shows; `docker stop`
    lets the page in flight answer within compose's stop_grace_period (40 s) instead of cutting it."""
    name = f"{PROJECT}-default"
    sh("docker", "run", "-d", "--name", name, "-e", "RTPRUNE_DEVICE=cpu", DEFAULT_IMAGE, "--model", "tiny")
    try:
        base = f"http://{address(name)}:8000"
        wait_healthy(name)
        assert sh("docker", "exec", name, "id", "-u").strip() == "10001"
        answer = ocr(base)
        assert answer.status_code == 200 and answer.json()["stats"]["visual_tokens"] > 0
        assert any("random" in w for w in answer.json()["warnings"])  # tiny's output is labelled
        in_flight: dict[str, httpx.Response] = {}
        request = threading.Thread(target=lambda: in_flight.update(answer=ocr(base, **SLOW_PAGE)))
        request.start()
        poll(lambda: running_pages(base) > 0, "the page started")
        sh("docker", "stop", "--time", "40", name)  # SIGTERM, then SIGKILL after compose's stop_grace_period
        request.join()
        assert in_flight["answer"].status_code == 200 and in_flight["answer"].json()["markdown"]
        assert inspect(name, "{{.State.ExitCode}}") == "0"  # it ended by itself: not killed at the grace period's end
    finally:
        sh("docker", "rm", "-f", name, check=False)


def serving(container: str, port: int, path: str) -> bool:
    """Whether the container answers 200 on ``path``; an exited container fails the test with its log."""
    if inspect(container, "{{.State.Running}}") != "true":
        raise AssertionError(f"{container} exited:\n{sh('docker', 'logs', '--tail', '40', container, check=False)}")
    try:
        return httpx.get(f"http://{address(container)}:{port}{path}", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def running_pages(base: str) -> float:
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("rtprune_running_pages "))


@pytest.fixture(scope="module")
def cpu_service(compose) -> str:
    """`--profile cpu up`: the CPU image with `tiny`, healthy; its container."""
    compose("--profile", "cpu", "up", "-d", "rtprune-ocr-cpu")
    container = compose.container("rtprune-ocr-cpu")
    wait_healthy(container)
    return container


def test_cpu_profile_ocrs_a_page_and_a_job_survives_the_process_being_killed(compose, cpu_service):
    base = f"http://{address(cpu_service)}:8000"
    assert ocr(base).status_code == 200
    job = httpx.post(f"{base}/v1/jobs", files={"file": ("three.pdf", text_pdf(3, lines=3))}, data=SLOW_PAGE)
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    poll(lambda: status(base, job_id)["state"] == "running", "the job running")
    # a crash, not a stop: SIGKILL to the service's process from the host (`docker kill` is a manual stop,
    # which restart policies ignore); `restart: unless-stopped` must bring it back
    restarts = int(inspect(cpu_service, "{{.RestartCount}}"))
    os.kill(int(inspect(cpu_service, "{{.State.Pid}}")), signal.SIGKILL)
    poll(lambda: int(inspect(cpu_service, "{{.RestartCount}}")) == restarts + 1, "a restart")
    wait_healthy(cpu_service)
    base = f"http://{address(cpu_service)}:8000"
    with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", timeout=300) as events:
        seen = list(sse_events(events.iter_lines()))
    pages = [data["page"] for event, data in seen if event == "page"]
    assert sorted(pages) == [1, 2, 3] and seen[-1][1]["state"] == "done", seen
    result = httpx.get(f"{base}/v1/jobs/{job_id}/result", timeout=30).json()
    assert [page["page"] for page in result["pages"]] == [1, 2, 3]  # every page exactly once


def status(base: str, job_id: str) -> dict:
    return httpx.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()


LOAD = {"RTPRUNE_LOAD_HOST": "http://rtprune-ocr-cpu:8000", "RTPRUNE_LOAD_USERS": "2", "RTPRUNE_LOAD_DURATION": "15"}


def test_load_profile_writes_its_report_into_the_folder_whoever_owns_it(compose, cpu_service):
    report = ROOT / "docker/load-report"
    shutil.rmtree(report, ignore_errors=True)  # missing: Docker makes it, as root
    try:
        compose("--profile", "load", "run", "--rm", "--no-deps", "loadtest", env=LOAD)
        assert "0 failed" in (report / "summary.txt").read_text()
        assert (report / "report.html").stat().st_size > 0
        shutil.rmtree(report)
        report.mkdir()
        os.chown(report, 4321, 4321)  # a user's own folder: the files become theirs
        compose("--profile", "load", "run", "--rm", "--no-deps", "loadtest", env=LOAD)
        assert {path.stat().st_uid for path in report.iterdir()} == {4321}
        os.chown(report, 0, 0)
        report.chmod(0o755)  # as the image's own user, a folder it cannot write: one clear line, exit 2
        out = compose(
            "--profile", "load", "run", "--rm", "--no-deps", "--user", "10001", "loadtest", env=LOAD, check=False
        )
        assert "error: cannot write the load report into /report" in out and "Traceback" not in out, out
    finally:
        shutil.rmtree(report, ignore_errors=True)


def test_postgres_profile_shares_jobs_between_two_service_containers(compose):
    jobs_url = {"RTPRUNE_JOBS_URL": "postgresql://rtprune:rtprune@postgres/rtprune"}
    compose("--profile", "postgres", "up", "-d", "--wait", "postgres")
    first = f"{PROJECT}-jobs-one"
    second = f"{PROJECT}-jobs-two"
    for name in (first, second):
        compose("--profile", "cpu", "run", "-d", "--no-deps", "--name", name, "rtprune-ocr-cpu", env=jobs_url)
    try:
        for name in (first, second):
            wait_healthy(name)
        one, two = (f"http://{address(name)}:8000" for name in (first, second))
        job_id = httpx.post(
            f"{one}/v1/jobs", files={"file": ("d.pdf", text_pdf(2, lines=3))}, data={"mode": "tiny"}
        ).json()["id"]
        with httpx.stream("GET", f"{two}/v1/jobs/{job_id}/events", timeout=300) as events:
            seen = list(sse_events(events.iter_lines()))
        assert seen[-1][1]["state"] == "done", seen
        assert [p["page"] for p in httpx.get(f"{two}/v1/jobs/{job_id}/result").json()["pages"]] == [1, 2]
        # in PostgreSQL, not in a SQLite file on the jobs volume the two containers also share
        rows = sh(
            "docker",
            "exec",
            compose.container("postgres"),
            "psql",
            "-U",
            "rtprune",
            "-d",
            "rtprune",
            "-tA",
            "-c",
            f"SELECT count(*) FROM rtprune_pages WHERE job_id = '{job_id}'",
        )
        assert rows.strip() == "2"
    finally:
        sh("docker", "rm", "-f", first, second, check=False)


def test_monitoring_profile_scrapes_the_service(compose, cpu_service):
    compose("--profile", "cpu", "--profile", "monitoring", "up", "-d", "prometheus")
    prometheus = f"http://{address(compose.container('prometheus'))}:9090"

    def query(expression: str) -> list[dict]:
        answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expression}, timeout=10)
        return answer.json()["data"]["result"] if answer.status_code == 200 else []

    poll(
        lambda: any(r["value"][1] == "1" for r in query('up{instance="rtprune-ocr-cpu:8000"}')),
        "Prometheus scraped rtprune-ocr-cpu",
    )
    series = query('rtprune_ready{instance="rtprune-ocr-cpu:8000"}')
    assert series and series[0]["value"][1] == "1", json.dumps(series)


def test_ray_profile_image_serves_two_replicas_on_cpu(compose):
    """The `ray` profile's image (EXTRAS with ray), run as its service runs it but on the CPU: two tiny
    replicas behind Ray Serve's proxy, each answering and each with its own metrics port."""
    compose("build", "rtprune-ocr-ray")
    name = f"{PROJECT}-ray"
    sh(
        "docker",
        "run",
        "-d",
        "--name",
        name,
        "--shm-size",
        "2g",
        "-e",
        "RTPRUNE_DEVICE=cpu",
        "-e",
        "RTPRUNE_REPLICAS=2",
        "rtprune-ocr:0.1.0-ray",
        "--model",
        "tiny",
    )
    try:
        wait_healthy(name)
        base = f"http://{address(name)}:8000"
        replicas: set[str] = set()

        def both_answered() -> bool:
            answers = [ocr(base, mode="tiny", max_new_tokens="4") for _ in range(4)]
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
            replicas.update(a.headers["x-replica-id"] for a in answers)
            return len(replicas) == 2

        poll(both_answered, "both replicas answering")
        for rank in (0, 1):
            assert "rtprune_ready 1.0" in httpx.get(f"http://{address(name)}:{9400 + rank}/metrics", timeout=10).text
    finally:
        sh("docker", "rm", "-f", name, check=False)


def test_vllm_profile_decodes_on_the_vllm_image_with_one_owner_of_the_shared_cache(compose):
    """The `vllm` profile's two containers on one network and one cache volume: vision + RTPrune in the
    service's image, decoding in vLLM's (its CPU build here). Both GPU services reserve an NVIDIA device,
    which no CI machine has, so they run with `docker run` from the shipped services' own image, user,
    volume, environment and flags, on the CPU, with the tiny checkpoint in place of DeepSeek-OCR."""
    services = yaml.safe_load((ROOT / "docker/docker-compose.yml").read_text())["services"]
    compose("--profile", "vllm", "run", "--rm", "cache-owner")  # as shipped: the volume made over to uid 10001
    network, volume = f"{PROJECT}_default", f"{PROJECT}_hf-cache"
    checkpoint = sh(
        "docker", "run", "--rm", "-v", f"{volume}:/cache", "--entrypoint", "python", DEFAULT_IMAGE, "-c",
        "from service.engine.weights.presets import tiny_checkpoint_dir; print(tiny_checkpoint_dir())",
    ).strip()  # fmt: skip
    vllm, vision = f"{PROJECT}-vllm", f"{PROJECT}-vision"
    spec = services["vllm"]
    flags = [checkpoint if arg == "deepseek-ai/DeepSeek-OCR" else arg for arg in spec["command"]]
    environment = [f"--env={name}={value}" for name, value in spec["environment"].items()]
    sh("docker", "run", "-d", "--name", vllm, "--network", network, "--network-alias", "vllm",
       "--user", spec["user"], "--ipc", spec["ipc"], "-v", f"{volume}:/cache", *environment,
       "--env=VLLM_CPU_KVCACHE_SPACE=1", compose.env["RTPRUNE_CI_VLLM_IMAGE"], *flags, "--dtype=float32")  # fmt: skip
    spec = services["rtprune-ocr-vllm"]
    environment = [
        f"--env={name}={value}"
        for name, value in spec["environment"].items()
        if name.startswith("RTPRUNE_") and name not in ("RTPRUNE_MODEL", "RTPRUNE_DEVICE", "RTPRUNE_JOBS_URL")
    ]
    try:
        poll(lambda: serving(vllm, 8000, "/v1/models"), "vLLM serving the checkpoint")  # as its depends_on waits
        sh("docker", "run", "-d", "--name", vision, "--network", network, "-v", f"{volume}:/cache", *environment,
           "--env=RTPRUNE_DEVICE=cpu", DEFAULT_IMAGE, "--model", "tiny")  # fmt: skip
        wait_healthy(vision)
        answer = ocr(f"http://{address(vision)}:8000", mode="tiny", max_new_tokens="16")
        assert answer.status_code == 200 and answer.json()["markdown"], answer.text
        assert "POST /v1/completions" in sh("docker", "logs", vllm, check=False)  # decoded over there
        strangers = sh("docker", "run", "--rm", "-v", f"{volume}:/cache", "--entrypoint", "find", DEFAULT_IMAGE,
                       "/cache", "-not", "-uid", "10001")  # fmt: skip
        assert not strangers.strip(), strangers
    finally:
        sh("docker", "rm", "-f", vision, vllm, check=False)
