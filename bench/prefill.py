"""Prefill speed versus retention on the full-size DeepSeek-OCR architecture (random weights).

    python bench/prefill.py --quick --out bench/results/prefill_quick_cpu.json
    python bench/prefill.py --device cuda --dtype bf16 --out bench/results/prefill_cuda.json
    python bench/prefill.py --batches 1,4,8,16 --dtype fp32 --out ...   # the batch axis (bench/prefill_batch.py)

Compute cost does not depend on weight values, so the ``random-full`` preset (the real
config.json, 3.3 B parameters) times exactly what the real model would. For each setting:

- ``llm_prefill_ms``: the language model's decoder layers over the prompt (as the paper times it);
- ``e2e_prefill_ms``: vision encoder + pruning + prompt assembly + decoder + LM head (first token);
- ``prune_ms``: the pruner alone; decode tokens/s; peak device memory (CUDA); prompt length.

Discipline: one warm-up pass per setting; then ``--repeats`` rounds in which every setting
runs once, in an order rotated each round (A B C, B C A, ...), clocks read after a device
synchronise. The vision encoder does not depend on the pruner, so it runs once per round and
its time is added to every setting of that round. Speedups are medians of per-round ratios
to ``none`` measured in the same round; the ideal speedup is the prompt-length ratio.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_label, summarize, write_json
from bench.pages import document_page
from pruning import build_pruner
from service.engine import OCREngine
from service.engine.assemble import assemble_prompt
from service.engine.decode.generate import generate
from service.engine.decode.sequence import NGramGuard
from service.engine.preprocess import preprocess
from service.engine.prompts import build_prompt, tokenize_prompt
from service.engine.stats import StageTimer

PAPER_POINT = (0.8425, 1.23)  # retention, LLM prefill speedup reported for Large mode
RETENTIONS = [1.0, 0.9, 0.8425, 0.7, 0.5, "auto"]


def _prompt(tokenizer, task: str, n_visual: int) -> tuple[torch.Tensor, int]:
    """Input ids of a task's prompt around ``n_visual`` image placeholders, and where they start."""
    prompt = tokenize_prompt(tokenizer, build_prompt(task))
    return torch.tensor(prompt.ids(n_visual)), prompt.image_start


def settings_for(quick: bool) -> list[tuple[str, float | str]]:
    if quick:
        return [("none", 1.0), ("rtprune", 0.8425)]
    return [("none", 1.0), *[("rtprune", r) for r in RETENTIONS], ("norm", 0.8425)]


def pages_for(quick: bool) -> dict[str, tuple[str, tuple[int, int]]]:
    pages = {"large": ("large", (1100, 800))}  # 421-token block
    if not quick:
        pages["gundam-3x2"] = ("gundam", (1100, 800))  # 3x2 tiles: 893-token block
    return pages


def prefill_once(engine: OCREngine, block, pruner, device) -> dict[str, float]:
    """Prune, assemble and prefill one visual block; return stage times and lengths."""
    model = engine.model
    timer = StageTimer(device)
    with timer.stage("prune"):
        pruned = pruner(block.features, block.protected, block.newline, block.global_view)
    with timer.stage("assemble"):
        ids, start = _prompt(model.tokenizer, "markdown", block.n_tokens)
        prompt = assemble_prompt(model.embed(ids), start, block.n_tokens, pruned.features, pruned.kept_indices)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.text_config)
    with timer.stage("llm"):
        out = model.decoder(
            inputs_embeds=prompt.embeds[None],
            position_ids=prompt.position_ids[None],
            past_key_values=cache,
            use_cache=True,
        )
    with timer.stage("head"):
        model.logits(out.last_hidden_state[0, -1])
    return {
        "prune_ms": timer.ms["prune"],
        "assemble_ms": timer.ms["assemble"],
        "llm_prefill_ms": timer.ms["llm"],
        "head_ms": timer.ms["head"],
        "prompt_tokens": prompt.length,
        "visual_tokens_kept": pruned.n_kept,
        "keep_ratio": pruned.keep_ratio,
    }


def decode_speed(engine: OCREngine, block, pruner, n_tokens: int) -> float:
    model = engine.model
    pruned = pruner(block.features, block.protected, block.newline, block.global_view)
    ids, start = _prompt(model.tokenizer, "markdown", block.n_tokens)
    prompt = assemble_prompt(model.embed(ids), start, block.n_tokens, pruned.features, pruned.kept_indices)
    timer = StageTimer(model.device)
    generation = generate(model, prompt, max_new_tokens=n_tokens, guard=NGramGuard(0, 0), timer=timer)
    return len(generation.tokens) / (timer.ms["decode"] / 1e3)


def run_page(engine, mode: str, size, settings, repeats: int, decode_tokens: int, device) -> list[dict]:
    page = preprocess(document_page(size), mode)
    pruners = [build_pruner(name, None if r == "auto" else r) for name, r in settings]
    with torch.inference_mode():
        block = engine.model.encode([page])[0]
        for pruner in pruners:  # warm-up
            prefill_once(engine, block, pruner, device)
        rounds: list[list[dict]] = [[] for _ in settings]
        vision_ms: list[float] = []
        peak_mb: list[float | None] = [None] * len(settings)
        for rep in range(repeats):
            vision = StageTimer(device)
            with vision.stage("vision"):
                block = engine.model.encode([page])[0]
            vision_ms.append(vision.ms["vision"])
            order = [(rep + i) % len(settings) for i in range(len(settings))]
            for i in order:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sample = prefill_once(engine, block, pruners[i], device)
                sample["e2e_prefill_ms"] = (
                    vision.ms["vision"]
                    + sample["prune_ms"]
                    + sample["assemble_ms"]
                    + sample["llm_prefill_ms"]
                    + sample["head_ms"]
                )
                rounds[i].append(sample)
                if device.type == "cuda":
                    peak_mb[i] = max(peak_mb[i] or 0.0, torch.cuda.max_memory_allocated(device) / 2**20)
            print(f"  {mode} round {rep + 1}/{repeats}: vision {vision.ms['vision']:.0f} ms", flush=True)
        decode = [decode_speed(engine, block, pruner, decode_tokens) for pruner in pruners]
    baseline = rounds[0]
    records = []
    for i, (name, retention) in enumerate(settings):
        samples = rounds[i]

        def series(key, samples=samples):
            return [s[key] for s in samples]

        def ratio(key, samples=samples):
            return statistics.median(b[key] / s[key] for b, s in zip(baseline, samples, strict=True))

        ideal = baseline[0]["prompt_tokens"] / samples[0]["prompt_tokens"]
        speedup_llm = ratio("llm_prefill_ms")
        records.append(
            {
                "mode": mode,
                "page_size": list(size),
                "pruner": name,
                "retention": retention,
                "keep_ratio": samples[0]["keep_ratio"],
                "visual_tokens": block.n_tokens,
                "visual_tokens_kept": samples[0]["visual_tokens_kept"],
                "prompt_tokens": samples[0]["prompt_tokens"],
                "llm_prefill_ms": summarize(series("llm_prefill_ms")),
                "e2e_prefill_ms": summarize(series("e2e_prefill_ms")),
                "prune_ms": summarize(series("prune_ms")),
                "vision_ms": summarize(vision_ms),
                "speedup_llm": speedup_llm,
                "speedup_e2e": ratio("e2e_prefill_ms"),
                "ideal_speedup": ideal,
                "efficiency": speedup_llm / ideal,
                "prune_share_of_e2e": statistics.median(s["prune_ms"] / s["e2e_prefill_ms"] for s in samples),
                "decode_tokens_per_s": decode[i],
                "decode_tokens": decode_tokens,
                "peak_memory_mb": peak_mb[i],
                "samples": samples,
            }
        )
    return records


def print_table(records: list[dict]) -> None:
    print(
        f"{'mode':>10} {'pruner':>8} {'ret':>7} {'kept':>9} {'prompt':>6} {'llm ms':>8} {'e2e ms':>9} "
        f"{'prune ms':>8} {'x llm':>6} {'x e2e':>6} {'ideal':>6} {'eff':>5} {'dec t/s':>8}"
    )
    for r in records:
        print(
            f"{r['mode']:>10} {r['pruner']:>8} {r['retention']!s:>7} "
            f"{r['visual_tokens_kept']:>4}/{r['visual_tokens']:<4} {r['prompt_tokens']:>6} "
            f"{r['llm_prefill_ms']['median']:>8.1f} {r['e2e_prefill_ms']['median']:>9.1f} "
            f"{r['prune_ms']['median']:>8.2f} {r['speedup_llm']:>6.3f} {r['speedup_e2e']:>6.3f} "
            f"{r['ideal_speedup']:>6.3f} {r['efficiency']:>5.2f} {r['decode_tokens_per_s']:>8.2f}"
        )


def plot(records: list[dict], path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for mode in dict.fromkeys(r["mode"] for r in records):
        rows = sorted(
            (r for r in records if r["mode"] == mode and r["pruner"] == "rtprune"),
            key=lambda r: r["visual_tokens_kept"],
        )
        if not rows:
            continue
        x = [r["visual_tokens_kept"] / r["visual_tokens"] for r in rows]
        ax.plot(x, [r["speedup_llm"] for r in rows], "o-", label=f"{mode}: LLM prefill (measured)")
        ax.plot(x, [r["speedup_e2e"] for r in rows], "s--", label=f"{mode}: end to end (measured)")
        ax.plot(x, [r["ideal_speedup"] for r in rows], ":", color="grey", label=f"{mode}: ideal (prompt ratio)")
    ax.plot(*PAPER_POINT, "r*", markersize=12, label="paper: Large, LLM prefill")
    ax.set_xlabel("visual tokens kept / total")
    ax.set_ylabel("speedup over unpruned")
    ax.set_title(f"RTPrune prefill speedup ({label})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Large mode, none vs rtprune 0.8425, bf16, 7 rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--decode-tokens", type=int, default=None, help="default 64 (16 with --quick)")
    parser.add_argument("--out", default="bench/results/prefill.json")
    parser.add_argument("--plot", default=None, help="PNG path (default: beside --out)")
    parser.add_argument("--batches", default=None, help="e.g. 1,4,8,16: LLM prefill of B pages at once instead")
    args = parser.parse_args()
    if args.repeats < 7:
        print("note: fewer than 7 rounds; medians will be noisy", file=sys.stderr)
    device = torch.device(args.device)
    torch.manual_seed(0)
    start = time.perf_counter()
    engine = OCREngine.load("random-full", device=args.device, dtype=args.dtype)
    print(f"loaded random-full in {time.perf_counter() - start:.0f} s on {machine_label(device)}", flush=True)
    if args.batches:
        batch_axis(engine, args, device)
        return
    settings = settings_for(args.quick)
    decode_tokens = args.decode_tokens or (16 if args.quick else 64)
    records = []
    for mode, size in pages_for(args.quick).values():
        records += run_page(engine, mode, size, settings, args.repeats, decode_tokens, device)
    label = f"{machine_label(device)}, {args.dtype}"
    print(f"# {label}, random-full, median of {args.repeats} interleaved rounds")
    print_table(records)
    out = Path(args.out)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # CPU: the whole process, not per setting
    write_json(
        out,
        {
            "process_peak_rss_mb": peak_rss_mb,
            "machine": label,
            "device": args.device,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "quick": args.quick,
            "paper_point": PAPER_POINT,
            "records": records,
        },
    )
    plot(records, Path(args.plot) if args.plot else out.with_suffix(".png"), label)


def batch_axis(engine: OCREngine, args, device: torch.device) -> None:
    from bench.prefill_batch import print_batch_table, run_batch_axis

    records = run_batch_axis(engine, [int(b) for b in args.batches.split(",")], args.repeats)
    label = f"{machine_label(device)}, {args.dtype}"
    print(f"# {label}, random-full, Large page, median of {args.repeats} interleaved rounds")
    print_batch_table(records)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_json(
        Path(args.out),
        {"machine": label, "repeats": args.repeats, "process_peak_rss_mb": peak_rss_mb, "records": records},
    )


if __name__ == "__main__":
    main()
