"""The GPU check never rots: CI runs it on the CPU with the tiny preset, every section to its end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["load", "modes", "padding", "vllm_budget", "prefill", "decode", "pruner", "vision", "batching"]


def run_check(out: Path, preset_cache: Path, budget_s: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--model", "tiny"]
    env = {**os.environ, "RTPRUNE_CACHE_DIR": str(preset_cache)}
    return subprocess.run(
        [*command, "--budget-s", str(budget_s), "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_the_gpu_check_runs_every_section_on_the_cpu_and_writes_each_as_it_ends(tmp_path, preset_cache):
    result = run_check(tmp_path, preset_cache, budget_s=600)  # ~20 s idle; room for a busy CI machine
    assert result.returncode == 0, result.stdout + result.stderr
    written = sorted(p.name for p in tmp_path.glob("0*.json"))
    assert written == [f"{i:02d}_{name}.json" for i, name in enumerate(SECTIONS)]
    records = {name: json.loads((tmp_path / f"{i:02d}_{name}.json").read_text()) for i, name in enumerate(SECTIONS)}
    assert all(record["ok"] for record in records.values())
    assert records["load"]["kv_bytes_per_token"] > 0 and records["load"]["facts"]["attention"] == "sdpa"
    assert records["modes"]["all_ok"] and len(records["modes"]["cases"]) == 5 * 3 * 2
    assert all(row["agree_tokens"] == row["of"] for row in records["padding"]["padded_batch"])  # fp32 on CPU
    assert records["vllm_budget"]["budget_on_vllm"] is None
    assert records["decode"]["profile"]["host_reads_per_step"] == {"tolist": 1}  # the step's one designed read
    assert records["batching"]["continuous"]["pages"] == records["batching"]["continuous"]["of"]


def test_a_run_out_of_time_still_writes_every_section(tmp_path, preset_cache):
    result = run_check(tmp_path, preset_cache, budget_s=0)
    assert result.returncode == 1  # nothing was checked: not a pass
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["section"] for s in summary["sections"]] == SECTIONS
    assert all(json.loads(p.read_text())["skipped"] for p in tmp_path.glob("0*.json"))
