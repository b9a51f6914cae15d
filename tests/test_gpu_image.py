"""The GPU check as the lent GPU machine runs it, rehearsed on a copy of that machine's Python.

The copy is a venv of the image's own packages (bench/gpu_image/image.txt: Python 3.12, torch 2.11's
CUDA build, transformers 5.17, no pydantic or POT), built by ``bench/gpu_image/venv.sh`` and named by
``RTPRUNE_GPU_IMAGE_VENV`` (``.ci/run`` builds it once per machine and sets it). The carried wheels are
made by ``bench/gpu_wheels.sh`` from a plain checkout and installed the documented way, and the
command that runs is the one the script prints and docs/gpu.md shows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
IMAGE_VENV = os.environ.get("RTPRUNE_GPU_IMAGE_VENV")
SECTIONS = ["load", "modes", "padding", "vllm_budget", "prefill", "decode", "pruner", "vision", "batching", "stall"]


def needs_image_venv() -> Path:
    if not IMAGE_VENV:
        reason = "set RTPRUNE_GPU_IMAGE_VENV to a venv made by bench/gpu_image/venv.sh (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must rehearse the GPU image: {reason}")
        pytest.skip(reason)
    return Path(IMAGE_VENV)


def pins(name: str) -> dict[str, str]:
    lines = (ROOT / "bench/gpu_image" / name).read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


@pytest.mark.parametrize("preset", ["carry-image.txt", "carry-bare.txt"])
def test_the_carried_versions_are_ones_the_project_accepts(preset):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges = {Requirement(r).name.lower(): Requirement(r).specifier for r in project["dependencies"]}
    carried = pins(preset)
    assert {"transformers", "pot", "pydantic"} <= set(carried)
    for name, version in carried.items():
        if name in ranges:
            assert version in ranges[name], f"{preset}: {name}=={version} is outside pyproject's {ranges[name]}"


@pytest.fixture(scope="module")
def carried(tmp_path_factory) -> tuple[Path, str]:
    """The image preset's wheels, made by the script from this checkout, and the command it prints."""
    folder = tmp_path_factory.mktemp("carry") / "whl"
    done = subprocess.run(
        ["bash", "bench/gpu_wheels.sh", "--dir", str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert len(list(folder.glob("*.whl"))) == len(pins("carry-image.txt"))
    command = done.stdout.strip().splitlines()[-1].strip()
    return folder, command


def test_the_printed_command_is_the_documented_one(carried):
    folder, command = carried
    for page in ("README.md", "docs/gpu.md"):
        documented = re.search(r"^(python3 -m pip install .*gpu_check\.py.*)$", (ROOT / page).read_text(), re.M)
        assert documented is not None and command == documented.group(1).replace(".whl/", f"{folder}/"), page


def test_the_gpu_check_runs_on_the_gpu_image_as_documented_and_returns_every_section_complete(
    carried, tmp_path, preset_cache
):
    venv = needs_image_venv()
    _, command = carried
    out, site = tmp_path / "out", Path("/tmp/site")
    shutil.rmtree(site, ignore_errors=True)  # the documented --target; a stale one must not help
    env = {
        "PATH": f"{venv}/bin:/usr/bin:/bin",  # `python3` there is the image's
        "HOME": os.environ.get("HOME", "/root"),
        "OUT": str(out),
        "RTPRUNE_CACHE_DIR": str(preset_cache),
    }
    out.mkdir()
    # the documented command, on the CPU with the tiny preset (the arguments after it win)
    done = subprocess.run(
        ["bash", "-c", f"{command} --device cpu --model tiny --budget-s 900"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    returned = sorted(p.name for p in out.iterdir())
    assert returned == ["gpu-check.tar.gz", "summary.json"]  # the lent machine returns at most 8 files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and [s["status"] for s in summary["sections"]] == ["complete"] * len(SECTIONS)
    assert summary["versions"]["torch"] == "2.11.0" and summary["facts"]["torch_cuda"]  # the image's CUDA build
    assert summary["versions"]["transformers"] == pins("carry-image.txt")["transformers"]  # the carried one won
    with tarfile.open(out / "gpu-check.tar.gz") as archive:
        assert archive.getnames() == [f"{i:02d}_{name}.json" for i, name in enumerate(SECTIONS)]
    assert (preset_cache / "presets").is_dir()  # the preset went where RTPRUNE_CACHE_DIR says


def test_a_bare_cuda_device_on_the_gpu_image_gets_past_the_index_and_fails_only_for_want_of_a_driver(carried):
    """torch's CUDA build with its device count patched to one GPU: everything above the driver runs."""
    venv = needs_image_venv()
    folder, _ = carried
    site = folder.parent / "site"
    subprocess.run(
        [f"{venv}/bin/python3", "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site)]
        + [str(w) for w in folder.glob("*.whl")],
        check=True,
        capture_output=True,
        timeout=600,
    )
    done = subprocess.run(
        [f"{venv}/bin/python3", "-m", "tests.emulated_cuda", "1", "cuda"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "specified index" not in result["error"]
    assert result["error"].startswith("RuntimeError") and "NVIDIA driver" in result["error"], result
