"""A corpus through `rtprune-ocr convert` against the same pages through `rtprune-ocr ocr`, a file at a time.

    python bench/convert.py --out bench/results/convert_tiny_cpu.json                       # tiny, CPU
    python bench/convert.py --model random-full --dtype fp32 --out bench/results/convert_full_cpu.json

Six PDFs of four synthetic pages (24 pages), the same options for both ways. ``ocr`` is what a user
scripts without ``convert``: one process per file, each loading the model and decoding its pages as
one batch. ``convert`` loads the model once and feeds every page of every document through the
service's scheduler, so pages of different documents decode together. Both are whole commands,
timed from start to exit (the model load included, as a user pays it); the rounds alternate which
goes first. Pages/s of each and their ratio per round are printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_label, write_json
from bench.pages import document_page


def write_corpus(folder: Path, documents: int, pages: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for d in range(documents):
        images = [document_page((1100, 800), seed=d * pages + p) for p in range(pages)]
        path = folder / f"doc{d}.pdf"
        images[0].save(path, save_all=True, append_images=images[1:], resolution=144)
        paths.append(path)
    return paths


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--mode", default="base")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--documents", type=int, default=6)
    parser.add_argument("--pages", type=int, default=4, help="pages per document")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/convert_tiny_cpu.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    files = write_corpus(work / "corpus", args.documents, args.pages)
    options = ["--model", args.model, "--device", args.device, "--mode", args.mode]
    options += ["--max-new-tokens", str(args.max_new_tokens), "--ngram-size", "0"]  # exact lengths
    options += ["--dtype", args.dtype] if args.dtype else []
    cli = [sys.executable, "-m", "service.cli"]
    total = args.documents * args.pages
    rounds = []
    for index in range(args.rounds):
        out = work / f"out{index}"
        ways = {
            "convert": lambda out=out: timed(
                [*cli, "convert", str(work / "corpus"), "--out", str(out), "--quiet", *options]
            ),
            "ocr_per_file": lambda: sum(timed([*cli, "ocr", str(path), *options]) for path in files),
        }
        order = list(ways) if index % 2 == 0 else list(reversed(ways))
        seconds = {name: ways[name]() for name in order}
        record = {name: {"seconds": s, "pages_per_s": total / s} for name, s in seconds.items()}
        record["ratio"] = record["convert"]["pages_per_s"] / record["ocr_per_file"]["pages_per_s"]
        record["order"] = order
        rounds.append(record)
        print(
            f"round {index + 1}: convert {record['convert']['pages_per_s']:.2f} pages/s, "
            f"ocr a file at a time {record['ocr_per_file']['pages_per_s']:.2f} pages/s: {record['ratio']:.2f}x",
            flush=True,
        )
        shutil.rmtree(out, ignore_errors=True)
    ratio = statistics.median(r["ratio"] for r in rounds)
    print(f"convert / ocr per file: {ratio:.2f}x (median of {len(rounds)} rounds, {total} pages)")
    write_json(
        args.out,
        {
            "machine": machine_label(args.device),
            "model": args.model,
            "mode": args.mode,
            "max_new_tokens": args.max_new_tokens,
            "documents": args.documents,
            "pages": total,
            "rounds": rounds,
            "ratio_median": ratio,
        },
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
