"""Timing helpers shared by the benchmarks: synchronised clocks, medians, machine label."""

from __future__ import annotations

import collections
import contextlib
import json
import platform
import statistics
from collections.abc import Callable, Iterator
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


HOST_READS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "cpu", "numpy")


@contextlib.contextmanager
def count_host_reads() -> Iterator[collections.Counter]:
    """Count the calls that bring a tensor's values to the host — on a GPU each waits for the device (a
    synchronisation) — by name: ``.item``, ``.tolist``, ``nonzero``, ``bool()``, ``.cpu()``, and
    indexing with a boolean mask. A proxy that also counts on the CPU, where nothing waits."""
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in [*HOST_READS, "__getitem__"]}
    original_nonzero = torch.nonzero

    def counted(name: str, method: Callable) -> Callable:
        def call(self, *args, **kwargs):
            counts[name] += 1
            return method(self, *args, **kwargs)

        return call

    def getitem(self, index):
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            counts["boolean index"] += 1
        return originals["__getitem__"](self, index)

    def nonzero(*args, **kwargs):
        counts["nonzero"] += 1
        return original_nonzero(*args, **kwargs)

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, counted(name, originals[name]))
        torch.Tensor.__getitem__ = getitem
        torch.nonzero = nonzero
        yield counts
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
        torch.nonzero = original_nonzero


@contextlib.contextmanager
def count_aten_ops() -> Iterator[collections.Counter]:
    """Count the aten operators run inside the block (each is at least one kernel launch on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: collections.Counter = collections.Counter()

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    with Counting():
        yield counts


def run_together(target: Callable[[], Any], copies: int) -> float:
    """Run ``copies`` threads of ``target`` at once and wait for all; returns the wall seconds."""
    import threading
    import time

    threads = [threading.Thread(target=target) for _ in range(copies)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started
