"""The GPU check never rots: CI runs it on the CPU with the tiny preset, every section to its end."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

from bench.gpu_check import Check, UnitClock, run_section

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["load", "modes", "padding", "vllm_budget", "prefill", "decode", "pruner", "vision", "batching", "stall"]


def run_check(out: Path, preset_cache: Path, budget_s: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--model", "tiny"]
    env = {**os.environ, "RTPRUNE_CACHE_DIR": str(preset_cache)}
    return subprocess.run(
        [*command, "--budget-s", str(budget_s), "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True
    )


def sections(out: Path) -> dict[str, dict]:
    with tarfile.open(out / "gpu-check.tar.gz") as archive:
        return {m.name[3:-5]: json.load(archive.extractfile(m)) for m in archive.getmembers()}


def test_the_gpu_check_runs_every_section_on_the_cpu_into_two_files(tmp_path, preset_cache):
    result = run_check(tmp_path, preset_cache, budget_s=3600)  # a budget no machine's load can exhaust
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-check.tar.gz", "summary.json"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["complete"] and [s["section"] for s in summary["sections"]] == SECTIONS
    records = sections(tmp_path)
    assert list(records) == SECTIONS and all(r["status"] == "complete" for r in records.values())
    assert records["load"]["kv_bytes_per_token"] > 0 and records["load"]["facts"]["attention"] == "sdpa"
    assert records["modes"]["all_ok"] and len(records["modes"]["cases"]) == 5 * 3 * 2
    assert all(row["agree_tokens"] == row["of"] > 0 for row in records["padding"]["padded_batch"])  # fp32 on CPU
    assert records["vllm_budget"]["budget_on_vllm"] is None
    assert records["decode"]["profile"]["host_reads_per_step"] == {"tolist": 1}  # the step's one designed read
    assert records["batching"]["continuous"]["pages"] == records["batching"]["continuous"]["of"]
    assert {"budget_off", "budget_on"} <= set(records["stall"])  # the join measured both ways
    assert (preset_cache / "presets").is_dir()  # the preset went where RTPRUNE_CACHE_DIR says


def test_a_run_out_of_time_still_writes_every_section_and_fails(tmp_path, preset_cache):
    result = run_check(tmp_path, preset_cache, budget_s=0)
    assert result.returncode == 1  # nothing was checked: not a pass
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not summary["complete"]
    assert [(s["section"], s["status"]) for s in summary["sections"]] == [(name, "skipped") for name in SECTIONS]


def a_check() -> Check:
    return Check(argparse.Namespace(budget_s=100.0, model="tiny", tokens=4), torch.device("cpu"))


def test_a_section_past_its_share_skips_what_is_left_names_it_and_is_partial():
    check = a_check()
    check.begin_section(0.0)

    def units(check: Check) -> dict:
        done = [n for n in range(3) if not check.out_of_time(f"unit {n}")]
        return {"done": done}

    record = run_section(check, units)
    assert record == {"done": [], "status": "partial", "skipped": ["unit 0", "unit 1", "unit 2"]}


def test_a_unit_is_sized_from_the_ones_before_it_and_skipped_if_it_would_overrun():
    check, clock = a_check(), UnitClock()
    check.begin_section(60.0)
    assert clock.estimate(100) == 0.0  # the probe
    with clock.unit(size=1):
        time.sleep(0.05)
    assert clock.estimate(2000) >= 100  # 2,000 times the probe: past a 60 s share
    assert check.out_of_time("big", clock.estimate(2000)) and not check.out_of_time("small", clock.estimate(1))
    assert check.skipped == ["big"]
    assert UnitClock(fallback=clock).estimate(10) == clock.estimate(10)


def test_a_section_that_raises_or_finds_a_check_false_has_failed_and_the_next_one_runs():
    check = a_check()
    check.begin_section(60.0)

    def raises(check: Check) -> dict:
        raise ValueError("NaN logits")

    failed = run_section(check, raises)
    assert failed["status"] == "failed" and failed["error"] == "ValueError: NaN logits"
    assert run_section(check, lambda check: {"ok": False})["status"] == "failed"
    assert run_section(check, lambda check: {"measured": 1}) == {"measured": 1, "status": "complete"}
