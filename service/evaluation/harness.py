"""Run every pruner x retention over labelled pages; compare with the truth and the unpruned run.

Results are cached per page and setting (one JSON file each, keyed by the run's
configuration), so an interrupted evaluation resumes where it stopped. Outputs in OUT:
``pages.csv`` (one row per page and setting), ``summary.json`` (one record per setting),
``relative_accuracy.png``, and the summary table on stdout.
"""

from __future__ import annotations

import csv
import hashlib
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from service.engine import OCREngine
from service.inputs import open_document

from .dataset import LabelledPage
from .metrics import edit_counts, normalized_edit_distance, relative_accuracy, set_edit_distance

PAPER_POINT = (0.8425, 0.9947)  # DeepSeek-OCR Large, OmniDocBench: retention, relative accuracy
BASELINE_PRUNER = "none"


@dataclass(frozen=True)
class Setting:
    pruner: str
    retention: float | str  # a number in (0, 1] or "auto"

    @property
    def label(self) -> str:
        return f"{self.pruner}@{self.retention}"


def settings_grid(pruners: list[str], retentions: list[float | str]) -> list[Setting]:
    """The unpruned baseline first, then every pruner x retention (``none`` only once)."""
    grid = [Setting(BASELINE_PRUNER, 1.0)]
    for pruner in pruners:
        for retention in retentions:
            setting = Setting(pruner, retention)
            if pruner != BASELINE_PRUNER and setting not in grid:
                grid.append(setting)
    return grid


def parse_retentions(text: str) -> list[float | str]:
    values: list[float | str] = []
    for item in text.split(","):
        item = item.strip()
        if item == "auto":
            values.append(item)
            continue
        value = float(item)
        if not 0.0 < value <= 1.0:
            raise ValueError(f"retention {item} is outside (0, 1]")
        values.append(value)
    return values


class Evaluation:
    """One evaluation run over ``pages`` with one engine, mode and token budget."""

    def __init__(
        self,
        engine: OCREngine,
        pages: list[LabelledPage],
        settings: list[Setting],
        *,
        mode: str,
        max_new_tokens: int,
        out: Path,
    ) -> None:
        self.engine, self.pages, self.settings = engine, pages, settings
        self.mode, self.max_new_tokens, self.out = mode, max_new_tokens, out
        key = json.dumps(
            {"model": engine.name, "mode": mode, "max_new_tokens": max_new_tokens, "decoder": engine.decoder_name},
            sort_keys=True,
        )
        self.cache = out / "cache" / hashlib.sha256(key.encode()).hexdigest()[:12]

    def _cached_run(self, page: LabelledPage, setting: Setting, image_cache: dict) -> dict:
        path = self.cache / f"{page.page_id}__{setting.pruner}__{setting.retention}.json"
        if path.exists():
            return json.loads(path.read_text())
        if page.page_id not in image_cache:
            image_cache.clear()
            image_cache[page.page_id] = open_document(page.image.read_bytes()).page(0)
        chosen = {"mode": self.mode, "pruner": setting.pruner, "retention": setting.retention}
        options, _ = self.engine.resolve_options({**chosen, "max_new_tokens": self.max_new_tokens})
        result = self.engine.run(image_cache[page.page_id], options)
        record = {"text": result.text, "markdown": result.markdown, "stats": result.stats.model_dump(mode="json")}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
        return record

    def run(self, progress: bool = True) -> list[dict]:
        """Compute (or read back) every output; write pages.csv and summary.json; return the summary."""
        rows = []
        image_cache: dict = {}
        total = len(self.pages) * len(self.settings)
        with tqdm(total=total, disable=not progress, desc="eval", unit="run") as bar:
            for page in self.pages:
                outputs = {}
                for setting in self.settings:
                    outputs[setting] = self._cached_run(page, setting, image_cache)
                    bar.update()
                baseline = outputs[self.settings[0]]
                for setting, record in outputs.items():
                    distance, length = edit_counts(record["text"], page.truth)
                    stats = record["stats"]
                    rows.append(
                        {
                            "page": page.page_id,
                            "pruner": setting.pruner,
                            "retention": setting.retention,
                            "edit_distance": distance / length if length else 0.0,
                            "edit_count": distance,
                            "max_length": length,
                            "agreement": 1.0 - normalized_edit_distance(record["text"], baseline["text"]),
                            "retention_used": stats["retention"],
                            "visual_tokens": stats["visual_tokens"],
                            "visual_tokens_kept": stats["visual_tokens_kept"],
                            "prompt_tokens": stats["prompt_tokens"],
                            "output_tokens": stats["output_tokens"],
                            "prefill_ms": stats["latency_ms"]["prefill"],
                            "baseline_prefill_ms": baseline["stats"]["latency_ms"]["prefill"],
                        }
                    )
        summary = self._summarize(rows)
        self._write(rows, summary)
        return summary

    def _summarize(self, rows: list[dict]) -> list[dict]:
        by_setting: dict[Setting, list[dict]] = {}
        for row in rows:
            by_setting.setdefault(Setting(row["pruner"], row["retention"]), []).append(row)
        baseline_ed = set_edit_distance((r["edit_count"], r["max_length"]) for r in by_setting[self.settings[0]])
        summary = []
        for setting in self.settings:
            group = by_setting[setting]
            ed = set_edit_distance((r["edit_count"], r["max_length"]) for r in group)
            summary.append(
                {
                    "pruner": setting.pruner,
                    "retention": setting.retention,
                    "pages": len(group),
                    "edit_distance": ed,
                    "relative_accuracy": relative_accuracy(ed, baseline_ed),
                    "agreement": statistics.fmean(r["agreement"] for r in group),
                    "mean_retention": statistics.fmean(r["retention_used"] for r in group),
                    "prefill_speedup": statistics.median(
                        r["baseline_prefill_ms"] / r["prefill_ms"] for r in group if r["prefill_ms"] > 0
                    ),
                }
            )
        return summary

    def _write(self, rows: list[dict], summary: list[dict]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / "pages.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        meta = {
            "model": self.engine.name,
            "random_weights": self.engine.random_weights,
            "mode": self.mode,
            "max_new_tokens": self.max_new_tokens,
            "pages": len(self.pages),
        }
        (self.out / "summary.json").write_text(json.dumps({**meta, "records": summary}, indent=2))


def print_summary(summary: list[dict]) -> None:
    print(
        f"{'pruner':>9} {'retention':>9} {'pages':>5} {'ED':>7} {'rel acc':>8} {'agree':>7} {'kept':>6} "
        f"{'x prefill':>9}"
    )
    for r in summary:
        print(
            f"{r['pruner']:>9} {r['retention']!s:>9} {r['pages']:>5} {r['edit_distance']:>7.4f} "
            f"{r['relative_accuracy']:>8.4f} {r['agreement']:>7.4f} {r['mean_retention']:>6.3f} "
            f"{r['prefill_speedup']:>9.3f}"
        )


def plot_summary(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for pruner in dict.fromkeys(r["pruner"] for r in summary):
        points = sorted((r["mean_retention"], r["relative_accuracy"]) for r in summary if r["pruner"] == pruner)
        ax.plot(*zip(*points, strict=True), "o-", label=pruner)
    ax.plot(*PAPER_POINT, "r*", markersize=12, label="paper: RTPrune, Large")
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_xlabel("visual tokens kept / total (mean)")
    ax.set_ylabel("relative accuracy (1 - ED) / (1 - ED unpruned)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
