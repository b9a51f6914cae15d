"""How long scoring a whole OmniDocBench v1.5-sized set takes: 1,355 synthetic pages of predictions.

    PYTHONPATH=. python bench/score_protocols.py [--pages 1355] [--out bench/results/score_protocols_cpu.json]

The pages are ``rtprune-ocr synth --format omnidocbench`` pages (no images needed), each scored
against a prediction with typos, a pipe table and its columns swapped on every third page, so
matching, TEDS and reading order all do real work; scored with quick_match (the default) and
simple_match side by side. Target (issue #27): under five minutes on the 2-core CI machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from service.evaluation.omnidocbench import score_page, summarize
from service.evaluation.omnidocbench_truth import load_truth
from service.evaluation.synth_benchmarks import write_omnidocbench
from tests.benchmark_pairs import prediction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=1355)
    parser.add_argument("--out", type=Path, default=Path("bench/results/score_protocols_cpu.json"))
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        annotations = write_omnidocbench(Path(folder), args.pages, seed=3, with_images=False)
        raw = json.loads(annotations.read_text())
        markdown = [prediction(index % 24, page) for index, page in enumerate(raw)]
        pages = load_truth(annotations)
        runs = {}
        for match in ("quick", "simple"):  # side by side in one run: the machine is noisy
            started = time.perf_counter()
            scores = [score_page(page, text, match) for page, text in zip(pages, markdown, strict=True)]
            summary = summarize(scores)
            seconds = time.perf_counter() - started
            runs[match] = {
                "seconds": seconds,
                "pages_per_s": args.pages / seconds,
                "pages_quick_match_timed_out": summary["pages_quick_match_timed_out"],
                "headline": {k: summary[k] for k in ("text_edit", "formula_edit", "table_teds", "reading_order_edit")},
            }
            print(f"{match}: scored {args.pages} pages in {seconds:.1f} s ({args.pages / seconds:.1f} pages/s)")
    result = {
        "pages": args.pages,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "match": runs,
        "quick_over_simple_seconds": runs["quick"]["seconds"] / runs["simple"]["seconds"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"quick_match takes {result['quick_over_simple_seconds']:.2f}x simple_match's time; wrote {args.out}")


if __name__ == "__main__":
    main()
