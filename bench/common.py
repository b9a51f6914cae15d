"""Timing helpers shared by the benchmarks: synchronised clocks, medians, machine label."""

from __future__ import annotations

import json
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from service.engine.stats import StageTimer


def time_ms(fn: Callable[[], Any], device: torch.device | str) -> float:
    """Wall time of one call in milliseconds, timed by the service's own (device-synchronised) StageTimer."""
    timer = StageTimer(device)
    with timer.stage("call"):
        fn()
    return timer.ms["call"]


def summarize(samples: list[float]) -> dict[str, float]:
    """Median and spread of a list of timings."""
    ordered = sorted(samples)
    return {
        "median": statistics.median(ordered),
        "p10": ordered[len(ordered) // 10],
        "p90": ordered[(len(ordered) * 9) // 10],
        "n": len(ordered),
    }


def machine_label(device: torch.device | str) -> str:
    """A one-line description of where the numbers were taken."""
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
