"""One GPU check: what to run first on a GPU host, in one command, within a time budget.

    python3 bench/gpu_check.py                       # a GPU: random-full, bf16, 8 minutes, results in /tmp
    python3 bench/gpu_check.py --device cpu --model tiny --budget-s 150   # the code path, on a CPU

Nothing of this project has run on a GPU before; this checks the serving path on one, in order of
value, on the ``random-full`` preset (the real architecture with random weights: the compute is the
real model's, the text is meaningless). Every section has a share of ``--budget-s``, checks the clock
between its units of work (sizing a long unit from the ones before it) and skips the units that would
not end inside its share. Each section ends ``complete``, ``partial`` (its ``skipped`` list names what
did not run) or ``failed`` (its error; the next section runs). The exit status is 0 only if every
section is complete.

``--out`` (outside the checkout by default) holds two files, rewritten as each section ends, so a run
cut short still leaves what it measured: ``summary.json`` (the statuses, versions, device) and
``gpu-check.tar.gz`` (one ``NN_name.json`` per section). A machine that returns at most a few files
(bench/gpu_wheels.sh prints the command for the lent one) gets them all.

 0 load         load time, GPU memory, device facts (torch and CUDA build, driver, attention and
                experts implementations), KV bytes per token, warm-up and the KV budget chosen
 1 modes        every mode x retention {1.0, 0.8425, auto} x positions: no NaN, sane statistics
 2 padding      a padded batch and a mid-decode join against each page alone: first-token logit
                difference and agreement over the first 16 tokens (bf16 is not batch-invariant)
 3 vllm_budget  the vLLM decoder's start-up path: the KV budget with the decoder layers freed
 4 prefill      LLM prefill of B pages at retention 1.0 / 0.8425 / 0.5, wall time beside kernel time
 5 decode       ms per decode step against rows and context width, and one step's profile
 6 pruner       the pruner on the device against the CPU, host reads per call
 7 vision       vision encoder time and peak memory per view and batch, against the estimate
 8 batching     continuous against static batching on Base pages
 9 stall        the longest pause between decode steps while a Gundam page joins running pages, the join
                budget off and on (stall-free joining), beside the page's own vision + prefill time

On a machine with PyTorch alone, carry the other wheels (``bench/gpu_wheels.sh``; docs/gpu.md).
Run from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import io
import json
import os
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import count_host_reads, summarize, time_ms
from bench.pages import document_page
from bench.prefill_batch import RETENTIONS, large_page_block, measure_batch, prefill_ms
from bench.pruner import BLOCKS, block_layout
from pruning import build_pruner
from service.engine import OCREngine, OcrOptions
from service.engine.decode import batch as batch_module
from service.engine.decode.batch import RunningBatch
from service.engine.device import memory_bytes
from service.engine.names import MODES_BY_VERSION
from service.engine.page import PageTask
from service.engine.preprocess import PreparedImage, preprocess
from service.engine.stats import StageTimer
from service.scheduler.capacity import step_times_ms, synthetic_sequences
from service.scheduler.memory import default_batch_tokens

# Each section's share of the budget; a section may finish early, and what it leaves goes to the rest.
SHARES = {
    "load": 0.16,
    "modes": 0.10,
    "padding": 0.08,
    "vllm_budget": 0.03,
    "prefill": 0.14,
    "decode": 0.14,
    "pruner": 0.07,
    "vision": 0.08,
    "batching": 0.14,
    "stall": 0.06,
}


DEFAULT_OUT = Path(tempfile.gettempdir()) / "rtprune-gpu-check"
ARCHIVE, SUMMARY = "gpu-check.tar.gz", "summary.json"
SUMMARY_KEYS = ("section", "status", "seconds", "skipped", "why", "error")


@dataclass
class Check:
    args: argparse.Namespace
    device: torch.device
    started: float = field(default_factory=time.monotonic)
    engine: OCREngine | None = None
    section_deadline: float = 0.0
    skipped: list[str] = field(default_factory=list)  # the current section's units that did not run
    pages: UnitClock = field(default_factory=lambda: UnitClock())  # one page's preparation, by vision cost

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        """Seconds left of the whole run."""
        return self.args.budget_s - (time.monotonic() - self.started)

    def begin_section(self, seconds: float) -> None:
        self.section_deadline = time.monotonic() + seconds
        self.skipped = []

    def out_of_time(self, unit: str, estimate_s: float = 0.0) -> bool:
        """Whether ``unit``, expected to take ``estimate_s``, would end past the section's share; if so it
        is recorded as skipped (the section ends ``partial``) and the caller goes on to the next unit,
        which is recorded too."""
        if time.monotonic() + estimate_s <= self.section_deadline:
            return False
        self.skipped.append(unit)
        return True

    def sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize(self.device)

    def page_options(self, **chosen) -> OcrOptions:
        return self.engine.resolve_options({"max_new_tokens": self.args.tokens, **chosen})[0]


class UnitClock:
    """Seconds per unit of work, learned from the units done so far: the estimate for the next one. Units
    scale with their ``size``; the largest rate seen is kept (estimates err long, so a share is not
    overrun). Before its first unit a clock estimates from ``fallback`` if it has one, else 0 s (that
    first unit is the probe: make it the smallest)."""

    def __init__(self, fallback: UnitClock | None = None) -> None:
        self.seconds_per_size = 0.0
        self.fallback = fallback

    def estimate(self, size: float = 1.0) -> float:
        if not self.seconds_per_size and self.fallback is not None:
            return self.fallback.estimate(size)
        return self.seconds_per_size * size

    @contextlib.contextmanager
    def unit(self, size: float = 1.0) -> Iterator[None]:
        started = time.monotonic()
        yield
        self.seconds_per_size = max(self.seconds_per_size, (time.monotonic() - started) / max(size, 1e-9))


def vision_cost(page: PreparedImage) -> float:
    """A page's size for the clocks: SAM's global attention grows with the square of a view's patches,
    so a view costs (side / 1024)^4 — long for the small parts of a small page, which errs on the side
    of skipping rather than overrunning."""
    sides = [page.global_view.shape[-1]]
    if page.tiles is not None:
        sides += [page.tiles.shape[-1]] * page.num_tiles
    return sum((side / 1024) ** 4 for side in sides)


def versions() -> dict[str, str | None]:
    found = {}
    for name in ("torch", "transformers", "pot", "pydantic", "tokenizers", "safetensors", "accelerate"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


# --- sections ------------------------------------------------------------------------------------------


def section_load(check: Check) -> dict[str, Any]:
    started = time.perf_counter()
    engine = OCREngine.load(check.args.model, device=str(check.device), dtype=check.args.dtype)
    check.sync()
    loaded_s = time.perf_counter() - started
    check.engine, check.device = engine, engine.device  # a bare "cuda" is now cuda:N
    after_load = memory_bytes(check.device)
    started = time.perf_counter()
    engine.warmup()  # as the service does: on a GPU every mode at its largest view, then the budget
    check.sync()
    return {
        "versions": versions(),
        "facts": engine.facts.as_dict(),
        "load_s": round(loaded_s, 2),
        "memory_after_load": after_load,
        "warmup_s": round(time.perf_counter() - started, 2),
        "memory_after_warmup": memory_bytes(check.device),
        "kv_bytes_per_token": engine.model.kv_bytes_per_token(),
        "kv_budget_tokens": default_batch_tokens(engine),
        "max_vision_bytes": engine.max_vision_bytes,
    }


def section_modes(check: Check) -> dict[str, Any]:
    engine, cases, clock = check.engine, [], check.pages  # the smallest mode first: the probe
    pages = {"document": document_page((1100, 800)), "tall": document_page((1240, 1754), seed=1)}
    for mode in MODES_BY_VERSION[engine.version]:
        page = "tall" if mode == "gundam" else "document"
        size = vision_cost(preprocess(pages[page], mode, version=engine.version))
        for retention in (1.0, 0.8425, "auto"):
            for positions in ("original", "compact"):
                unit = f"{mode.value} retention {retention} positions {positions}"
                if check.out_of_time(unit, clock.estimate(size)):
                    continue
                case = {"mode": mode.value, "retention": retention, "positions": positions, "page": page}
                try:
                    options = check.page_options(mode=mode, retention=retention, positions=positions)
                    with clock.unit(size):
                        stats = engine.run(pages[page], options).stats
                    requested = stats.grid_tokens * retention if retention != "auto" else None
                    case.update(
                        ok=True,
                        visual_tokens=stats.visual_tokens,
                        kept=stats.visual_tokens_kept,
                        grid_retention=stats.retention,
                        prompt_tokens=stats.prompt_tokens,
                        output_tokens=stats.output_tokens,
                        latency_ms=stats.latency_ms.model_dump(),
                        sane=stats.visual_tokens_kept <= stats.visual_tokens
                        and stats.output_tokens >= 1
                        and (requested is None or abs(stats.grid_tokens_kept - requested) <= 1 + 0.01 * requested),
                    )
                except Exception as exc:  # NaN logits, a shape error: recorded, the next case runs
                    case.update(ok=False, error=f"{type(exc).__name__}: {exc}")
                cases.append(case)
    return {"cases": cases, "all_ok": all_ok(cases), "ok": all_ok(cases)}


def all_ok(cases: list[dict[str, Any]]) -> bool:
    return all(case["ok"] and case["sane"] for case in cases)


@contextlib.contextmanager
def first_logits() -> Iterator[list[torch.Tensor]]:
    """The logits every prefill and step chose from (float32, on the host), in order."""
    seen: list[torch.Tensor] = []
    original = batch_module._choose

    def recording(logits, bans):
        seen.append(logits.detach().float().cpu())
        return original(logits, bans)

    batch_module._choose = recording
    try:
        yield seen
    finally:
        batch_module._choose = original


def decode_alone(check: Check, task: PageTask, steps: int) -> tuple[list[int], torch.Tensor]:
    """A page decoded alone for up to ``steps`` tokens, the clock checked before each step; its tokens
    and the logits its first token was chosen from."""
    page = check.engine.prepare([task])[0]
    batch = RunningBatch(check.engine.model)
    with first_logits() as seen:
        batch.join([page.sequence])
    decode_until(check, batch, f"{task.options.mode} alone", lambda: len(page.sequence.tokens) >= steps)
    return list(page.sequence.tokens), seen[0][0]


def decode_until(check: Check, batch: RunningBatch, unit: str, done: Callable[[], bool]) -> None:
    """Decode steps until ``done`` or the batch empties; a step past the section's share is not taken
    (recorded as skipped with how far the unit got)."""
    taken = 0
    while batch.rows and not done():
        if time.monotonic() > check.section_deadline:
            check.skipped.append(f"{unit}: stopped after {taken} decode steps")
            return
        batch.step()
        taken += 1


def logit_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference between two logit vectors where both are finite (masked ids are -inf)."""
    finite = torch.isfinite(a) & torch.isfinite(b)
    return float((a[finite] - b[finite]).abs().max())


def agreement(a: list[int], b: list[int]) -> int:
    """Tokens the two agree on before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def section_padding(check: Check) -> dict[str, Any]:
    engine, steps, clock = check.engine, 16, UnitClock(fallback=check.pages)
    modes = [m for m in ("large", "gundam", "tiny") if m in {x.value for x in MODES_BY_VERSION[engine.version]}]
    tasks = [
        PageTask(document_page((1100, 800), seed=i), check.page_options(mode=m, max_new_tokens=steps), StageTimer())
        for i, m in enumerate(modes)
    ]
    sizes = [vision_cost(preprocess(task.image, task.options.mode, version=engine.version)) for task in tasks]
    alone: dict[str, tuple[list[int], torch.Tensor]] = {}
    for mode, task, size in zip(modes, tasks, sizes, strict=True):  # the prepare is sized by pixels
        if not check.out_of_time(f"{mode} alone", clock.estimate(size)):
            with clock.unit(size):
                alone[mode] = decode_alone(check, task, steps)
    result: dict[str, Any] = {"dtype": str(engine.model.dtype), "padded_batch": [], "mid_decode_join": None}
    if not alone:
        return result
    # the pages measured alone, together (left-padded: every row but the longest), as far as they got
    together = [(mode, task) for mode, task in zip(modes, tasks, strict=True) if mode in alone]
    size = sum(size for mode, size in zip(modes, sizes, strict=True) if mode in alone)
    if not check.out_of_time("padded batch", clock.estimate(size)):
        pages = engine.prepare([task for _, task in together])
        batch = RunningBatch(engine.model)
        with first_logits() as seen:
            batch.join([page.sequence for page in pages])
        longest = max(len(alone[mode][0]) for mode, _ in together)
        decode_until(check, batch, "padded batch", lambda: all(len(p.sequence.tokens) >= longest for p in pages))
        for (mode, _), page, joined in zip(together, pages, seen[0], strict=True):
            tokens, logits = alone[mode]
            result["padded_batch"].append(
                {
                    "mode": mode,
                    "first_token_equal": bool(tokens[:1] == page.sequence.tokens[:1]),
                    "first_logit_max_abs_diff": logit_difference(logits, joined),
                    "logit_std": float(logits[torch.isfinite(logits)].std()),
                    "agree_tokens": agreement(tokens, page.sequence.tokens),
                    "of": min(len(tokens), len(page.sequence.tokens)),
                    "nan": bool(torch.isnan(joined).any()),
                }
            )
    # a page joining a batch that has run five steps
    if len(together) < 2:
        check.skipped.append("mid-decode join (needs two pages measured alone)")
        return result
    (_, first_task), (second_mode, second_task) = together[:2]
    if check.out_of_time("mid-decode join", clock.estimate(sizes[0] + sizes[1])):
        return result
    first, second = engine.prepare([first_task, second_task])
    batch = RunningBatch(engine.model)
    batch.join([first.sequence])
    for _ in range(5):
        batch.step()
    with first_logits() as seen:
        batch.join([second.sequence])
    tokens, logits = alone[second_mode]
    result["mid_decode_join"] = {
        "first_logit_max_abs_diff": logit_difference(logits, seen[0][0]),
        "first_token_equal": bool(tokens[:1] == second.sequence.tokens[:1]),
    }
    return result


def section_vllm_budget(check: Check) -> dict[str, Any]:
    """The start-up of RTPRUNE_DECODER=vllm on this device, up to its KV budget (no vLLM server needed)."""
    engine = OCREngine.load("tiny", device=str(check.device), dtype=check.args.dtype)
    engine.model.release_decoder_layers()
    per_token = engine.model.kv_bytes_per_token()
    on_vllm = OCREngine(engine.model, decoder=object())
    return {
        "kv_bytes_per_token_after_release": per_token,
        "budget_without_layers": default_batch_tokens(engine),
        "budget_on_vllm": default_batch_tokens(on_vllm),
        "ok": True,
    }


def kernel_ms(check: Check, fn: Callable[[], Any]) -> float | None:
    """Device time of the kernels ``fn`` launches (torch.profiler), None off a GPU."""
    if not check.gpu:
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        check.sync()
    return sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA") / 1e3


def section_prefill(check: Check) -> dict[str, Any]:
    engine, clock = check.engine, UnitClock()
    batches = [1, 4, 8, 16, 32] if check.gpu else [1, 4]
    repeats = 3 if check.gpu else 2
    calls = len(RETENTIONS) * (repeats + 1)  # a batch size's unit: a warm-up and the rounds, every retention
    large = vision_cost(preprocess(document_page((1100, 800)), "large", version=engine.version))
    if check.out_of_time("a Large page's preparation, and so every batch size", check.pages.estimate(large)):
        return {"batch_axis": [], "wall_vs_kernel": []}
    with check.pages.unit(large):
        block = large_page_block(engine)
    if check.out_of_time("probe: one prefill of one page"):
        return {"batch_axis": [], "wall_vs_kernel": []}
    with clock.unit(1):  # the cost of a page's prefill, from which each batch size's unit is sized
        prefill_ms(engine, block, 1, 1.0)
    records = []
    for b in batches:
        if not check.out_of_time(f"batch axis B={b}", clock.estimate(b * calls)):
            with clock.unit(b * calls):
                records += measure_batch(engine, block, b, repeats)
    kernels = []
    for b in (1, 16) if check.gpu else (1,):
        for retention in (1.0, 0.8425):
            if check.out_of_time(f"kernel time B={b} retention {retention}", clock.estimate(2 * b)):
                continue
            kernels.append(
                {
                    "batch": b,
                    "retention": retention,
                    "wall_ms": prefill_ms(engine, block, b, retention)[0],
                    "kernel_ms": kernel_ms(check, lambda b=b, r=retention: prefill_ms(engine, block, b, r)),
                }
            )
    return {"retentions": list(RETENTIONS), "batch_axis": records, "wall_vs_kernel": kernels}


def section_decode(check: Check) -> dict[str, Any]:
    """ms per decode step by rows and context, the slot cache beside the padded one (random K/V: a step's
    cost does not depend on the values), and one step's profile."""
    from bench.decode_step import filled_batch

    engine, results, clock = check.engine, [], UnitClock()
    shapes = [(r, w) for w in (1024, 4096) for r in (1, 8, 32, 128)] if check.gpu else [(1, 256), (8, 256)]
    free = torch.cuda.mem_get_info(check.device)[0] if check.gpu else None
    steps = 8 if check.gpu else 2
    for rows, width in shapes:  # a shape's cost grows with the tokens it holds
        if check.out_of_time(f"{rows} rows x {width}", clock.estimate(rows * width)):
            continue
        if free is not None and rows * width * engine.model.kv_bytes_per_token() * 3 > free:
            results.append({"rows": rows, "width": width, "not_measured": "would not fit"})
            continue
        record: dict[str, Any] = {"rows": rows, "width": width}
        with clock.unit(rows * width):
            for layout in ("slots", "padded"):
                batch = filled_batch(engine, layout, rows, width)
                record[f"{layout}_ms"] = summarize(step_times_ms(engine, batch, steps))
                del batch
                if check.gpu:
                    torch.cuda.empty_cache()
        record["padded_over_slots"] = record["padded_ms"]["median"] / record["slots_ms"]["median"]
        results.append(record)
    profile_width = 1024 if check.gpu else 128
    if check.out_of_time("one step's profile", 3 * clock.estimate(8 * profile_width)):
        return {"steps": results, "profile": None}
    return {"steps": results, "profile": step_profile(check, profile_width)}


def step_profile(check: Check, width: int) -> dict[str, Any] | None:
    """Where one step of 8 rows x ``width`` goes: kernel time, the KV cache's concatenation, host reads."""
    engine = check.engine
    batch = RunningBatch(engine.model)
    batch.join(synthetic_sequences(engine, 8, width, budget=10))
    batch.step()
    with count_host_reads() as reads:
        batch.step()
    if not check.gpu:
        return {"host_reads_per_step": dict(reads)}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        batch.step()
        check.sync()
    events = prof.key_averages()
    cuda_ms = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3
    by_op = {e.key: e.device_time_total / 1e3 for e in events if e.key in ("aten::cat", "aten::index", "aten::bmm")}
    launches = sum(e.count for e in events if e.device_type.name == "CUDA")
    return {"kernel_ms": cuda_ms, "kernel_launches": launches, "op_ms": by_op, "host_reads_per_step": dict(reads)}


def section_pruner(check: Check) -> dict[str, Any]:
    results, clock = [], UnitClock()
    hidden = check.engine.model.text_config.hidden_size
    for name in ("large-421", "gundam-3x2-893"):
        protected, newline, side = block_layout(*BLOCKS[name])
        for where in (check.device, torch.device("cpu")) if check.gpu else (check.device,):
            features = torch.randn(protected.numel(), hidden, device=where, dtype=check.engine.model.dtype)
            image = torch.rand(3, side, side, device=where) * 2 - 1
            masks = protected.to(where), newline.to(where)
            for retention in (0.8425, None):
                unit = f"{name} on {where} retention {retention or 'auto'}"
                if check.out_of_time(unit, clock.estimate(protected.numel())):
                    continue
                with clock.unit(protected.numel()):
                    pruner = build_pruner("rtprune", retention)
                    pruner(features, *masks, image)  # warm
                    call = functools.partial(pruner, features, *masks, image)
                    times = [time_ms(call, where) for _ in range(10)]
                    with count_host_reads() as reads:
                        pruner(features, *masks, image)
                results.append(
                    {
                        "block": name,
                        "device": str(where),
                        "retention": retention or "auto",
                        "ms": summarize(times),
                        "host_reads": dict(reads),
                    }
                )
    together = None
    # a unit above is 12 calls of one page; together is 2 retentions x 3 calls of 16 pages
    if not check.out_of_time("16 pages pruned together", clock.estimate(16 * 421) * 6 / 12):
        together = pruner_together(check, hidden)
    return {"calls": results, "together": together}


def pruner_together(check: Check, hidden: int) -> list[dict[str, Any]]:
    """16 Large pages pruned in one call (one admission's worth), per page, on the device."""
    from pruning import RTPrune, prune_together

    protected, newline, side = block_layout(*BLOCKS["large-421"])
    protected, newline = protected.to(check.device), newline.to(check.device)
    pages = [
        (
            torch.randn(421, hidden, device=check.device, dtype=check.engine.model.dtype),
            torch.rand(3, side, side, device=check.device) * 2 - 1,
        )
        for _ in range(16)
    ]
    out = []
    for retention in (0.8425, None):
        calls = [(RTPrune(retention), x, protected, newline, image) for x, image in pages]
        prune_together(calls)  # warm
        per_page = time_ms(lambda c=calls: prune_together(c), check.device) / len(calls)
        with count_host_reads() as reads:
            prune_together(calls)
        out.append({"retention": retention or "auto", "ms_per_page": per_page, "host_reads": dict(reads)})
    return out


def section_vision(check: Check) -> dict[str, Any]:
    engine, results, clock = check.engine, [], UnitClock(fallback=check.pages)
    cases = [("large", 1), ("large", 4), ("large", 16), ("gundam", 8)] if check.gpu else [("base", 1), ("base", 2)]
    for mode, count in cases:
        view = preprocess(document_page((1240, 1754)), mode, version=engine.version)
        size = count * vision_cost(view)
        if check.out_of_time(f"{mode} x {count}", clock.estimate(size)):
            continue
        views = [view] * count
        if check.gpu:
            torch.cuda.reset_peak_memory_stats(check.device)
        before = memory_bytes(check.device)["allocated"]
        with clock.unit(size):
            engine.model.encode(views)  # warm
            ms = time_ms(lambda v=views: engine.model.encode(v), check.device)
        peak = memory_bytes(check.device)["peak"] - before if check.gpu else None
        estimate = sum(engine.model.vision_bytes(v) for v in views)
        results.append(
            {"mode": mode, "pages": count, "ms_per_page": ms / count, "peak_bytes": peak, "estimate_bytes": estimate}
        )
    return {"calls": results}


def section_batching(check: Check) -> dict[str, Any]:
    """Continuous against static batching, closed loop: N Base pages of mixed lengths submitted at once.
    Each run has half of what is left of the share, as its pages' deadline: the scheduler ends a page
    past it, and such pages are reported as skipped."""
    from service.inputs import Document
    from service.scheduler import PageRequest, Scheduler, SchedulerConfig

    engine, runs = check.engine, {}
    n, short, long = (32, 16, 256) if check.gpu else (6, 2, 8)
    image = document_page((1100, 800))
    admission = n * check.pages.estimate(vision_cost(preprocess(image, "base", version=engine.version)))
    for index, batching in enumerate(("continuous", "static")):
        share = (check.section_deadline - time.monotonic()) / (2 - index)
        if check.out_of_time(f"{batching} batching", admission if share > admission else float("inf")):
            continue
        scheduler = Scheduler(lambda: engine, SchedulerConfig(batching=batching, warmup=False, max_batch_size=n))
        scheduler.start()
        while scheduler.state == "loading":
            time.sleep(0.01)
        started = time.monotonic()
        requests, latencies = [], []
        for i in range(n):
            tokens = long if i % 3 == 0 else short
            options = check.page_options(mode="base", max_new_tokens=tokens, ngram_size=0)
            request = PageRequest(Document([1], _images=[image]), options, deadline=started + share)
            request.future.add_done_callback(functools.partial(record_latency, latencies, started))
            scheduler.submit(request)
            requests.append(request)
        for request in requests:
            with contextlib.suppress(Exception):
                request.future.result(timeout=max(0.1, started + share + 5 - time.monotonic()))
        elapsed = max(latencies, default=time.monotonic() - started)
        scheduler.stop(timeout=24 * 3600)  # its thread ends after the step in hand: wait for it, a step at most
        if len(latencies) < n:
            check.skipped.append(f"{batching} batching: {n - len(latencies)} of {n} pages past its share")
        runs[batching] = {
            "pages": len(latencies),
            "of": n,
            "seconds": elapsed,
            "latency_s": summarize(latencies) if latencies else None,
        }
    if all(runs.get(b, {}).get("pages") == n for b in ("continuous", "static")):
        runs["throughput_ratio"] = runs["static"]["seconds"] / runs["continuous"]["seconds"]
    return runs


def section_stall(check: Check) -> dict[str, Any]:
    """Stall-free joining: while pages decode, a Gundam page joins with the join budget off (its whole vision and
    prefill between two steps) and on (in pieces): the longest pause between two steps, and the page's own
    vision + prefill time it is measured against."""
    from bench.decode_step import join_gap

    image = document_page((1700, 2200))
    estimate = 3 * check.pages.estimate(vision_cost(preprocess(image, "gundam", version=check.engine.version)))
    runs: dict[str, Any] = {}
    for name, budget in (("budget_off", 0.0), ("budget_on", None)):
        if check.out_of_time(f"join {name}", estimate):
            continue
        gap = join_gap(check.engine, 8 if check.gpu else 2, join_budget_ms=budget)
        latency = gap["gundam_latency_ms"]
        gap["pause_over_vision_and_prefill"] = gap["largest_gap_while_joining_ms"] / (
            latency["vision"] + latency["prefill"]
        )
        runs[name] = gap
    return runs


def record_latency(latencies: list[float], started: float, future) -> None:
    if future.exception() is None:
        latencies.append(time.monotonic() - started)


SECTIONS: list[tuple[str, Callable[[Check], dict[str, Any]]]] = [
    ("load", section_load),
    ("modes", section_modes),
    ("padding", section_padding),
    ("vllm_budget", section_vllm_budget),
    ("prefill", section_prefill),
    ("decode", section_decode),
    ("pruner", section_pruner),
    ("vision", section_vision),
    ("batching", section_batching),
    ("stall", section_stall),
]


def run(check: Check, out: Path) -> list[dict[str, Any]]:
    """Every section in order; after each, ``out`` holds the summary and the archive of the sections so far."""
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    summary: list[dict[str, Any]] = []
    remaining_share = sum(SHARES.values())
    for number, (name, section) in enumerate(SECTIONS):
        left = check.left()
        if left < 5 or (name != "load" and check.engine is None):
            record = {"status": "skipped", "why": "no time left" if left < 5 else "the model did not load"}
        else:
            check.begin_section(left * SHARES[name] / remaining_share)
            started = time.monotonic()
            record = run_section(check, section)
            record["seconds"] = round(time.monotonic() - started, 2)
        remaining_share -= SHARES[name]
        record["section"] = name
        records[f"{number:02d}_{name}.json"] = record
        print(f"[{time.monotonic() - check.started:6.1f} s] {name}: {record['status']}", flush=True)
        summary.append({key: record[key] for key in SUMMARY_KEYS if key in record})
        write_results(out, check, records, summary)
    return summary


def run_section(check: Check, section: Callable[[Check], dict[str, Any]]) -> dict[str, Any]:
    """One section's record with its status: failed (an error, or a check that did not hold), partial
    (units skipped for time, listed), else complete."""
    try:
        with torch.inference_mode():
            record = section(check)
    except Exception as exc:
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    if record.pop("ok", True) is False:
        record["status"] = "failed"
    elif check.skipped:
        record["status"] = "partial"
    else:
        record["status"] = "complete"
    if check.skipped:
        record["skipped"] = list(check.skipped)
    return record


def write_results(out: Path, check: Check, records: dict[str, dict[str, Any]], summary: list[dict[str, Any]]) -> None:
    """``out``/gpu-check.tar.gz (one JSON per section) and ``out``/summary.json, each replaced whole."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, record in records.items():
            data = json.dumps(record, indent=2, default=str).encode()
            member = tarfile.TarInfo(name)
            member.size, member.mtime = len(data), int(time.time())
            archive.addfile(member, io.BytesIO(data))
    load = records.get("00_load.json", {})
    overview = {
        "complete": len(summary) == len(SECTIONS) and all(s["status"] == "complete" for s in summary),
        "budget_s": check.args.budget_s,
        "elapsed_s": round(time.monotonic() - check.started, 1),
        "model": check.args.model,
        "device": str(check.device),
        "versions": load.get("versions") or versions(),
        "facts": load.get("facts"),
        "sections": summary,
        "archive": ARCHIVE,
    }
    replace_file(out / ARCHIVE, buffer.getvalue())
    replace_file(out / SUMMARY, json.dumps(overview, indent=2, default=str).encode() + b"\n")


def replace_file(path: Path, data: bytes) -> None:
    """Write beside, then rename: a run killed mid-write leaves the previous version, never half of one."""
    staging = path.with_name(f".{path.name}.partial")
    staging.write_bytes(data)
    os.replace(staging, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="random-full", help="random-full on a GPU; tiny for a quick CPU run")
    parser.add_argument("--dtype", default=None, help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole run, in seconds")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per page (default 32 GPU, 4 CPU)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.tokens = args.tokens or (32 if device.type == "cuda" else 4)
    summary = run(Check(args, device), args.out)
    print(f"results: {args.out / SUMMARY} and {args.out / ARCHIVE}")
    sys.exit(0 if all(s["status"] == "complete" for s in summary) else 1)


if __name__ == "__main__":
    main()
