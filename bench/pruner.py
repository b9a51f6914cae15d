"""Time the pruner alone on the real DeepSeek-OCR block sizes (C = 1280), and count what it asks of the device.

    python bench/pruner.py --device cpu --repeats 50 --out bench/out/pruner_cpu.json
    python bench/pruner.py --ops --out bench/results/pruner_ops.json     # aten ops and host reads per page

Blocks: Tiny 73, Small 111, Base 273, Large 421, Gundam 3x2 tiles 893 and 1x9 tiles 1263
tokens, with the real newline/separator layout. Fixed ratio (0.8425) and dynamic ratio.
The pruner list is interleaved per repetition so machine noise hits every setting alike.

``--ops`` counts, for a Large block, the aten operators (each at least one kernel launch on a GPU)
and the host reads (``item``, ``tolist``, ``nonzero``, ``bool()``, boolean indexing: each a
synchronisation on a GPU) of one RTPrune call: the per-image walk (POT's log-domain solve), the
batched path alone, and 16 pages pruned together, per page.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import count_aten_ops, count_host_reads, machine_label, summarize, time_ms, write_json
from pruning import RTPrune, TokenPruner, build_pruner, prune_together

HIDDEN = 1280


def block_layout(global_q: int, tiles: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """protected/newline masks and the global-view side for a v1 block."""
    parts = []
    if tiles is not None:
        cols, rows = tiles
        parts.append((rows * 10, cols * 10))
    parts.append((global_q, global_q))
    newline = torch.cat(
        [torch.nn.functional.pad(torch.zeros(r, c, dtype=torch.bool), (0, 1), value=True).flatten() for r, c in parts]
        + [torch.zeros(1, dtype=torch.bool)]
    )
    protected = newline.clone()
    protected[-1] = True
    return protected, newline, global_q * 64


BLOCKS = {
    "tiny-73": (8, None),
    "small-111": (10, None),
    "base-273": (16, None),
    "large-421": (20, None),
    "gundam-3x2-893": (16, (3, 2)),
    "gundam-1x9-1263": (16, (1, 9)),
}


def ops_per_page(device: torch.device, dtype: torch.dtype, repeats: int) -> list[dict]:
    """Aten ops and host reads per page of one RTPrune call on a Large block: the per-image walk, the
    batched path alone, and 16 pages together."""
    protected, newline, side = block_layout(*BLOCKS["large-421"])
    protected, newline = protected.to(device), newline.to(device)
    gen = torch.Generator().manual_seed(0)
    features = [(torch.randn(421, HIDDEN, generator=gen) * 2).to(device, dtype) for _ in range(16)]
    pages = [(x, (torch.rand(3, side, side, generator=gen) * 2 - 1).to(device)) for x in features]
    x0, image0 = pages[0]
    records = []
    for ratio in (0.8425, None):
        runs = {
            "per-image walk": (1, lambda r=ratio: TokenPruner.__call__(RTPrune(r), x0, protected, newline, image0)),
            "batched, alone": (1, lambda r=ratio: RTPrune(r)(x0, protected, newline, image0)),
            "batched, 16 together": (
                16,
                lambda r=ratio: prune_together([(RTPrune(r), x, protected, newline, image) for x, image in pages]),
            ),
        }
        for name, (n_pages, run) in runs.items():
            run()  # warm (lazy inits are not the steady state)
            with count_aten_ops() as ops, count_host_reads() as reads:
                run()
            times = [time_ms(run, device) / n_pages for _ in range(repeats)]
            records.append(
                {
                    "retention": "auto" if ratio is None else ratio,
                    "path": name,
                    "pages": n_pages,
                    "aten_ops_per_page": sum(ops.values()) / n_pages,
                    "host_reads_per_call": sum(reads.values()),
                    "host_reads": dict(reads),
                    "ms_per_page": summarize(times),
                }
            )
    print(f"{'retention':>9} {'path':>22} {'aten ops/page':>14} {'host reads/call':>16} {'ms/page':>8}")
    for r in records:
        print(
            f"{r['retention']!s:>9} {r['path']:>22} {r['aten_ops_per_page']:>14.1f} {r['host_reads_per_call']:>16} "
            f"{r['ms_per_page']['median']:>8.1f}"
        )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--ops", action="store_true", help="count aten ops and host reads per page instead")
    parser.add_argument("--out", default="bench/out/pruner.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.ops:
        records = ops_per_page(device, dtype, args.repeats)
        write_json(args.out, {"device": machine_label(device), "dtype": args.dtype, "ops": records})
        return
    settings = [("rtprune", 0.8425), ("rtprune", None), ("norm", 0.8425), ("divprune", 0.8425)]
    records = []
    print(f"# pruner timings on {machine_label(device)}, {args.dtype}, median of {args.repeats}")
    print(f"{'block':>16} {'pruner':>9} {'ratio':>7} {'median ms':>10} {'p10':>8} {'p90':>8}")
    for block_name, (q, tiles) in BLOCKS.items():
        protected, newline, side = block_layout(q, tiles)
        gen = torch.Generator().manual_seed(0)
        features = (torch.randn(protected.numel(), HIDDEN, generator=gen) * 2).to(device, dtype)
        image = (torch.rand(3, side, side, generator=gen) * 2 - 1).to(device)
        protected, newline = protected.to(device), newline.to(device)
        pruners = [(name, ratio, build_pruner(name, ratio)) for name, ratio in settings]
        for _, _, pruner in pruners:  # warm-up
            pruner(features, protected, newline, image)
        samples: dict[int, list[float]] = {i: [] for i in range(len(pruners))}
        for _ in range(args.repeats):
            for i, (_, _, pruner) in enumerate(pruners):
                samples[i].append(time_ms(partial(pruner, features, protected, newline, image), device))
        for i, (name, ratio, _) in enumerate(pruners):
            stats = summarize(samples[i])
            ratio_label = "auto" if ratio is None else f"{ratio:g}"
            records.append(
                {
                    "block": block_name,
                    "n_tokens": protected.numel(),
                    "pruner": name,
                    "retention": ratio_label,
                    "prune_ms": stats,
                    "samples_ms": samples[i],
                }
            )
            print(
                f"{block_name:>16} {name:>9} {ratio_label:>7} {stats['median']:>10.2f} "
                f"{stats['p10']:>8.2f} {stats['p90']:>8.2f}"
            )
    write_json(args.out, {"device": machine_label(device), "dtype": args.dtype, "records": records})


if __name__ == "__main__":
    main()
