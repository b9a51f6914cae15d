"""Time the pruner alone on the real DeepSeek-OCR block sizes (C = 1280).

    python bench/pruner.py --device cpu --repeats 50 --out bench/out/pruner_cpu.json

Blocks: Tiny 73, Small 111, Base 273, Large 421, Gundam 3x2 tiles 893 and 1x9 tiles 1263
tokens, with the real newline/separator layout. Fixed ratio (0.8425) and dynamic ratio.
The pruner list is interleaved per repetition so machine noise hits every setting alike.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_label, summarize, time_ms, write_json
from pruning import build_pruner

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="bench/out/pruner.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
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
