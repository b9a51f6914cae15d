"""One GPU check: what to run first on a GPU host, in one command, within a time budget.

    python bench/gpu_check.py --out gpu-check                                  # a GPU: random-full, bf16, 8 min
    python bench/gpu_check.py --device cpu --model tiny --budget-s 150 --out /tmp/gpu-check   # CI: the code path

Nothing of this project has run on a GPU before; this checks the serving path on one, in order of
value, on the ``random-full`` preset (the real architecture with random weights: the compute is the
real model's, the text is meaningless). Each section writes ``NN_name.json`` under ``--out`` as soon as
it finishes, and each watches the clock (its share of ``--budget-s``), so a run cut short still
leaves what it measured; a section that fails writes its error and the next one runs.

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
 8 batching     continuous against static batching on Base pages, if time remains

On a machine with PyTorch alone, carry the other wheels (``bench/gpu_wheels.sh``; README, "Checking a
GPU"). Run from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import json
import sys
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
from bench.prefill_batch import run_batch_axis
from bench.pruner import BLOCKS, block_layout
from pruning import build_pruner
from service.engine import OCREngine, OcrOptions
from service.engine.decode import batch as batch_module
from service.engine.decode.batch import RunningBatch
from service.engine.device import memory_bytes
from service.engine.engine import PageTask
from service.engine.names import MODES_BY_VERSION
from service.engine.preprocess import preprocess
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
    "batching": 0.20,
}


@dataclass
class Check:
    args: argparse.Namespace
    device: torch.device
    started: float = field(default_factory=time.monotonic)
    engine: OCREngine | None = None
    section_deadline: float = 0.0

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        """Seconds left of the whole run."""
        return self.args.budget_s - (time.monotonic() - self.started)

    def expired(self) -> bool:
        """The current section's time is up (its loops stop and report what they have)."""
        return time.monotonic() > self.section_deadline

    def sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize(self.device)

    def page_options(self, **chosen) -> OcrOptions:
        return self.engine.resolve_options({"max_new_tokens": self.args.tokens, **chosen})[0]


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
    after_load = memory_bytes(check.device)
    check.engine = engine
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
    engine, cases = check.engine, []
    pages = {"document": document_page((1100, 800)), "tall": document_page((1240, 1754), seed=1)}
    for mode in MODES_BY_VERSION[engine.version]:
        for retention in (1.0, 0.8425, "auto"):
            for positions in ("original", "compact"):
                if check.expired():
                    return {"cases": cases, "cut_short": True, "all_ok": all_ok(cases)}
                page = "tall" if mode == "gundam" else "document"
                case = {"mode": mode.value, "retention": retention, "positions": positions, "page": page}
                try:
                    options = check.page_options(mode=mode, retention=retention, positions=positions)
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
    return {"cases": cases, "all_ok": all_ok(cases)}


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


def decode_alone(engine: OCREngine, task: PageTask, steps: int) -> tuple[list[int], torch.Tensor]:
    page = engine.prepare([task])[0]
    batch = RunningBatch(engine.model)
    with first_logits() as seen:
        batch.join([page.sequence])
    while batch.rows and len(page.sequence.tokens) < steps:
        batch.step()
    return list(page.sequence.tokens), seen[0][0]


def logit_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference between two logit vectors where both are finite (masked ids are -inf)."""
    finite = torch.isfinite(a) & torch.isfinite(b)
    return float((a[finite] - b[finite]).abs().max())


def agreement(a: list[int], b: list[int]) -> int:
    """Tokens the two agree on before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def section_padding(check: Check) -> dict[str, Any]:
    engine, steps = check.engine, 16
    modes = [m for m in ("large", "gundam", "tiny") if m in {x.value for x in MODES_BY_VERSION[engine.version]}]
    tasks = [
        PageTask(document_page((1100, 800), seed=i), check.page_options(mode=m, max_new_tokens=steps), StageTimer())
        for i, m in enumerate(modes)
    ]
    alone = [decode_alone(engine, task, steps) for task in tasks]
    pages = engine.prepare(tasks)
    batch = RunningBatch(engine.model)
    with first_logits() as seen:
        batch.join([page.sequence for page in pages])  # left-padded: every row but the longest
    while batch.rows and not check.expired():
        batch.step()
    rows = []
    for mode, (tokens, logits), page, joined in zip(modes, alone, pages, seen[0], strict=True):
        rows.append(
            {
                "mode": mode,
                "first_token_equal": bool(tokens[:1] == page.sequence.tokens[:1]),
                "first_logit_max_abs_diff": logit_difference(logits, joined),
                "logit_std": float(logits[torch.isfinite(logits)].std()),
                "agree_tokens": agreement(tokens, page.sequence.tokens),
                "of": min(steps, len(tokens)),
                "nan": bool(torch.isnan(joined).any()),
            }
        )
    # a page joining a batch that has run five steps
    first, second = engine.prepare(tasks[:2])
    batch = RunningBatch(engine.model)
    batch.join([first.sequence])
    for _ in range(5):
        batch.step()
    with first_logits() as seen:
        batch.join([second.sequence])
    join = {
        "first_logit_max_abs_diff": logit_difference(alone[1][1], seen[0][0]),
        "first_token_equal": bool(alone[1][0][:1] == second.sequence.tokens[:1]),
    }
    return {"padded_batch": rows, "mid_decode_join": join, "dtype": str(engine.model.dtype)}


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
    from bench.prefill_batch import prefill_ms

    engine = check.engine
    batches = [1, 4, 8, 16, 32] if check.gpu else [1, 4]
    records = run_batch_axis(engine, batches, repeats=3 if check.gpu else 2)
    image = document_page((1100, 800))
    block = engine.prepare([PageTask(image, OcrOptions(mode="large", pruner="none"), StageTimer())])[0].block
    kernels = []
    for b in (1, 16) if check.gpu else (1,):
        for retention in (1.0, 0.8425):
            if check.expired():
                break
            kernels.append(
                {
                    "batch": b,
                    "retention": retention,
                    "wall_ms": prefill_ms(engine, block, b, retention)[0],
                    "kernel_ms": kernel_ms(check, lambda b=b, r=retention: prefill_ms(engine, block, b, r)),
                }
            )
    return {"batch_axis": records, "wall_vs_kernel": kernels}


def section_decode(check: Check) -> dict[str, Any]:
    """ms per decode step by rows and context, the slot cache beside the padded one (random K/V: a step's
    cost does not depend on the values), and one step's profile."""
    from bench.decode_step import filled_batch

    engine, results = check.engine, []
    shapes = [(r, w) for w in (1024, 4096) for r in (1, 8, 32, 128)] if check.gpu else [(1, 256), (8, 256)]
    free = torch.cuda.mem_get_info(check.device)[0] if check.gpu else None
    steps = 8 if check.gpu else 2
    for rows, width in shapes:
        if check.expired():
            return {"steps": results, "cut_short": True, "profile": None}
        if free is not None and rows * width * engine.model.kv_bytes_per_token() * 3 > free:
            results.append({"rows": rows, "width": width, "skipped": "would not fit"})
            continue
        record: dict[str, Any] = {"rows": rows, "width": width}
        for layout in ("slots", "padded"):
            batch = filled_batch(engine, layout, rows, width)
            record[f"{layout}_ms"] = summarize(step_times_ms(engine, batch, steps))
            del batch
            if check.gpu:
                torch.cuda.empty_cache()
        record["padded_over_slots"] = record["padded_ms"]["median"] / record["slots_ms"]["median"]
        results.append(record)
    return {"steps": results, "profile": step_profile(check)}


def step_profile(check: Check) -> dict[str, Any] | None:
    """Where one step of 8 rows x 1024 goes: kernel time, the KV cache's concatenation, host reads."""
    engine = check.engine
    batch = RunningBatch(engine.model)
    batch.join(synthetic_sequences(engine, 8, 1024 if check.gpu else 128, budget=10))
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
    results = []
    hidden = check.engine.model.text_config.hidden_size
    for name in ("large-421", "gundam-3x2-893"):
        protected, newline, side = block_layout(*BLOCKS[name])
        for where in (check.device, torch.device("cpu")) if check.gpu else (check.device,):
            features = torch.randn(protected.numel(), hidden, device=where, dtype=check.engine.model.dtype)
            image = torch.rand(3, side, side, device=where) * 2 - 1
            masks = protected.to(where), newline.to(where)
            for retention in (0.8425, None):
                if check.expired():
                    return {"calls": results, "cut_short": True}
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
    return {"calls": results, "together": pruner_together(check, hidden)}


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
    engine, results = check.engine, []
    cases = [("large", 1), ("large", 4), ("large", 16), ("gundam", 8)] if check.gpu else [("base", 1), ("base", 2)]
    for mode, count in cases:
        if check.expired():
            return {"calls": results, "cut_short": True}
        view = preprocess(document_page((1240, 1754)), mode, version=engine.version)
        views = [view] * count
        if check.gpu:
            torch.cuda.reset_peak_memory_stats(check.device)
        before = memory_bytes(check.device)["allocated"]
        engine.model.encode(views)  # warm
        ms = time_ms(lambda v=views: engine.model.encode(v), check.device)
        peak = memory_bytes(check.device)["peak"] - before if check.gpu else None
        estimate = sum(engine.model.vision_bytes(v) for v in views)
        results.append(
            {"mode": mode, "pages": count, "ms_per_page": ms / count, "peak_bytes": peak, "estimate_bytes": estimate}
        )
    return {"calls": results}


def section_batching(check: Check) -> dict[str, Any]:
    """Continuous against static batching, closed loop: N Base pages of mixed lengths submitted at once."""
    from service.inputs import Document
    from service.scheduler import PageRequest, Scheduler, SchedulerConfig

    engine, runs = check.engine, {}
    n, short, long = (32, 16, 256) if check.gpu else (6, 2, 8)
    image = document_page((1100, 800))
    for batching in ("continuous", "static"):
        if check.expired():
            break
        scheduler = Scheduler(lambda: engine, SchedulerConfig(batching=batching, warmup=False, max_batch_size=n))
        scheduler.start()
        while scheduler.state == "loading":
            time.sleep(0.01)
        started = time.monotonic()
        requests, latencies = [], []
        for i in range(n):
            tokens = long if i % 3 == 0 else short
            options = check.page_options(mode="base", max_new_tokens=tokens, ngram_size=0)
            request = PageRequest(Document([1], _images=[image]), options, deadline=started + check.left())
            request.future.add_done_callback(functools.partial(record_latency, latencies, started))
            scheduler.submit(request)
            requests.append(request)
        for request in requests:
            with contextlib.suppress(Exception):
                request.future.result(timeout=max(1.0, check.section_deadline - time.monotonic()))
        elapsed = max(latencies, default=time.monotonic() - started)
        scheduler.stop()
        runs[batching] = {
            "pages": len(latencies),
            "of": n,
            "seconds": elapsed,
            "latency_s": summarize(latencies) if latencies else None,
        }
    if len(runs) == 2 and runs["static"]["pages"] and runs["continuous"]["pages"]:
        runs["throughput_ratio"] = (runs["continuous"]["pages"] / runs["continuous"]["seconds"]) / (
            runs["static"]["pages"] / runs["static"]["seconds"]
        )
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
]


def run(check: Check, out: Path) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    remaining_share = sum(SHARES.values())
    for number, (name, section) in enumerate(SECTIONS):
        path = out / f"{number:02d}_{name}.json"
        left = check.left()
        if left < 5 or (name != "load" and check.engine is None):
            record = {"skipped": "no time left" if left < 5 else "the model did not load"}
        else:
            check.section_deadline = time.monotonic() + left * SHARES[name] / remaining_share
            started = time.monotonic()
            try:
                with torch.inference_mode():
                    record = section(check)
                record["ok"] = record.get("ok", True)
            except Exception as exc:
                record = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            record["seconds"] = round(time.monotonic() - started, 2)
        remaining_share -= SHARES[name]
        record["section"] = name
        path.write_text(json.dumps(record, indent=2, default=str))
        status = "skipped" if "skipped" in record else ("ok" if record.get("ok") else "FAILED")
        print(f"[{time.monotonic() - check.started:6.1f} s] {name}: {status} -> {path}", flush=True)
        summary.append({"section": name, "status": status, "seconds": record.get("seconds")})
    (out / "summary.json").write_text(json.dumps({"budget_s": check.args.budget_s, "sections": summary}, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="random-full", help="random-full on a GPU; tiny for a quick CPU run")
    parser.add_argument("--dtype", default=None, help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole run, in seconds")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per page (default 32 GPU, 4 CPU)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    args = parser.parse_args()
    device = torch.device(args.device)
    args.tokens = args.tokens or (32 if device.type == "cuda" else 4)
    summary = run(Check(args, device), args.out)
    sys.exit(0 if all(s["status"] == "ok" for s in summary) else 1)


if __name__ == "__main__":
    main()
