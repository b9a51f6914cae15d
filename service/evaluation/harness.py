"""Run a grid of modes x pruners x retentions over a benchmark's pages; score it the benchmark's way.

Every setting's predictions are cached per page (one JSON file each, under a key made of the
model, decoder, token budget and, for ``--url``, the service's address), so an interrupted
evaluation resumes where it stopped. Each setting is scored by the protocol and reported
*relative to the unpruned model in the same mode* (the paper's "accuracy retained"), with the
visual tokens kept, prompt tokens and prefill times beside it. Outputs in OUT: ``pages.csv``
(a row per page and setting), ``summary.json`` and ``summary.csv`` (a record per setting),
``relative.png``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .protocols import EvalPage, Protocol, find_prediction, relative

PAPER_POINT = (0.8425, 0.9947)  # DeepSeek-OCR Large, OmniDocBench: retention, relative accuracy
BASELINE_PRUNER = "none"
PREFILL_STAGES = ("preprocess", "vision", "prune", "assemble", "prefill")  # image in -> first token out
MIN_TIMED_PAGES = 5  # fewer pages per setting: the speed columns are left empty


@dataclass(frozen=True)
class Setting:
    mode: str
    pruner: str
    retention: float | str  # a number in (0, 1] or "auto"

    @property
    def label(self) -> str:
        return f"{self.mode}/{self.pruner}@{self.retention}"

    @property
    def baseline(self) -> Setting:
        return Setting(self.mode, BASELINE_PRUNER, 1.0)


def settings_grid(modes: list[str], pruners: list[str], retentions: list[float | str]) -> list[Setting]:
    """Per mode: the unpruned baseline first, then every pruner x retention (``none`` only once)."""
    grid: list[Setting] = []
    for mode in modes:
        grid.append(Setting(mode, BASELINE_PRUNER, 1.0))
        for pruner in pruners:
            for retention in retentions:
                setting = Setting(mode, pruner, retention)
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


# A runner turns (page, setting) into {"markdown": str, "stats": PageStats as a dict}.
Runner = Callable[[EvalPage, Setting], dict[str, Any]]


def engine_runner(engine, max_new_tokens: int) -> Runner:
    """Pages run in this process on a loaded ``OCREngine``."""
    from service.inputs import open_document

    images: dict[str, Any] = {}

    def run(page: EvalPage, setting: Setting) -> dict[str, Any]:
        if page.page_id not in images:
            images.clear()  # pages come one at a time: keep only the current image
            images[page.page_id] = open_document(page.image.read_bytes()).page(0)
        options, _ = engine.resolve_options({**_setting_fields(setting), "max_new_tokens": max_new_tokens})
        result = engine.run(images[page.page_id], options)
        return {"markdown": result.markdown, "stats": result.stats.model_dump(mode="json")}

    return run


class PageFailed(RuntimeError):
    """A page the service would not read (its answer says why); the grid stops, its cache kept."""


def service_client(base: str, api_key: str | None = None, timeout: float = 600.0):
    """An HTTP client for a running service: its base URL and, when it has one, its API key."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=base.rstrip("/"), timeout=timeout, headers=headers)


def ready_service_info(client, timeout: float = 600.0) -> dict[str, Any]:
    """The service's ``/v1/info`` once it is ready (a service still loading its model says which weights only
    then); a RuntimeError that says why when it cannot be reached, refuses the key, or will not read pages."""
    import httpx

    from service.loadtest import wait_ready

    base = str(client.base_url).rstrip("/")  # httpx keeps a trailing slash on it
    try:
        response = client.get("/v1/info", timeout=30)
    except httpx.TransportError as exc:
        raise RuntimeError(f"cannot reach {base}: {exc}") from exc
    if response.status_code in (401, 403):
        raise RuntimeError(f"{base} refused the API key (HTTP {response.status_code}): pass --api-key")
    if response.status_code != 200:
        raise RuntimeError(f"{base}/v1/info answered HTTP {response.status_code}; is this an rtprune-ocr service?")
    state = response.json().get("state")
    if state in ("failed", "draining", "stopped"):
        raise RuntimeError(f"{base} is {state}: it will not read pages (its /readyz says why)")
    if state != "ready":
        wait_ready(base, timeout=timeout)
        response = client.get("/v1/info", timeout=30)
    return response.json()


def url_runner(client, max_new_tokens: int) -> Runner:
    """Pages sent to a running service's ``POST /v1/ocr`` (waiting out 503s as its Retry-After says)."""
    import time

    import httpx

    base = str(client.base_url).rstrip("/")  # httpx keeps a trailing slash on it

    def run(page: EvalPage, setting: Setting) -> dict[str, Any]:
        data = {
            "mode": setting.mode,
            "pruner": setting.pruner,
            "retention": str(setting.retention),
            "max_new_tokens": str(max_new_tokens),
        }
        for _ in range(100):
            try:
                with page.image.open("rb") as handle:
                    response = client.post("/v1/ocr", files={"file": (page.image.name, handle)}, data=data)
            except httpx.TransportError as exc:
                raise PageFailed(f"lost {base} on {page.image.name}: {exc}") from exc
            if response.status_code != 503:
                break
            time.sleep(float(response.headers.get("retry-after", "1")))
        if response.status_code != 200:
            raise PageFailed(f"{base} answered {response.status_code} for {page.image.name}: {response.text[:300]}")
        first = response.json()["pages"][0]
        return {"markdown": first["markdown"], "stats": first["stats"]}

    return run


class Evaluation:
    """One grid over ``pages``, scored by ``protocol``; ``run_page`` computes a prediction."""

    def __init__(
        self,
        protocol: Protocol,
        pages: list[EvalPage],
        settings: list[Setting],
        run_page: Runner,
        *,
        cache_key: dict[str, Any],
        out: Path,
    ) -> None:
        self.protocol, self.pages, self.settings, self.run_page, self.out = protocol, pages, settings, run_page, out
        key = json.dumps(cache_key, sort_keys=True)
        self.cache = out / "cache" / hashlib.sha256(key.encode()).hexdigest()[:12]
        self.cache_key = cache_key
        self._warm: set[Setting] = set()

    def _prediction(self, page: EvalPage, setting: Setting) -> dict[str, Any]:
        path = self.cache / setting.mode / f"{page.page_id}__{setting.pruner}__{setting.retention}.json"
        if path.exists():
            return json.loads(path.read_text())
        if setting not in self._warm:  # a setting's first page pays for cold kernels and caches: not timed
            self.run_page(page, setting)
            self._warm.add(setting)
        record = self.run_page(page, setting)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(record))
        path.with_suffix(".tmp").replace(path)  # a run killed mid-write leaves no half file behind
        return record

    def run(self, progress: bool = True) -> list[dict[str, Any]]:
        """Compute (or read back) every prediction; score; write the outputs; return the summary."""
        outputs: dict[Setting, list[dict[str, Any]]] = {s: [] for s in self.settings}
        with tqdm(total=len(self.pages) * len(self.settings), disable=not progress, desc="eval", unit="page") as bar:
            for index, page in enumerate(self.pages):  # rounds: every setting on a page, in a rotated order
                turn = index % len(self.settings)
                for setting in self.settings[turn:] + self.settings[:turn]:
                    outputs[setting].append(self._prediction(page, setting))
                    bar.update()
        rows, summary = [], []
        for setting in self.settings:
            scores = [self.protocol.score(p, o["markdown"]) for p, o in zip(self.pages, outputs[setting], strict=True)]
            for page, score, output in zip(self.pages, scores, outputs[setting], strict=True):
                rows.append(
                    {**_setting_fields(setting), **self.protocol.record(score), **_stats_fields(output["stats"])}
                )
                rows[-1]["page"] = page.page_id
            summary.append({**_setting_fields(setting), **self._setting_summary(scores, outputs, setting)})
        self._add_relative(summary)
        self._write(rows, summary)
        self._write_predictions(outputs)
        return summary

    def _write_predictions(self, outputs: dict[Setting, list[dict[str, Any]]]) -> None:
        """Each setting's markdown as ``predictions/<mode>_<pruner>_<retention>/<image stem>.md``, the names
        OmniDocBench's evaluator reads: its own matching (``quick_match``), CDM and Overall, which we do not
        compute, can be run on exactly these outputs, and ``--predictions`` scores them again."""
        for setting, records in outputs.items():
            folder = self.out / "predictions" / f"{setting.mode}_{setting.pruner}_{setting.retention}"
            folder.mkdir(parents=True, exist_ok=True)
            for page, record in zip(self.pages, records, strict=True):
                (folder / f"{page.page_id}.md").write_text(record["markdown"])

    def _setting_summary(self, scores: list[Any], outputs: dict, setting: Setting) -> dict[str, Any]:
        stats = [o["stats"] for o in outputs[setting]]
        base = [o["stats"] for o in outputs[setting.baseline]]
        fields = [_stats_fields(s) for s in stats]

        def speedup(key: str) -> float | None:
            if len(fields) < MIN_TIMED_PAGES:  # a ratio of a few pages' times is noise, not a result
                return None
            ratios = [b[key] / f[key] for b, f in zip(map(_stats_fields, base), fields, strict=True) if f[key] > 0]
            return statistics.median(ratios) if ratios else None

        return {
            **self.protocol.summarize(scores),
            "retention_used": statistics.fmean(f["retention_used"] for f in fields),
            "visual_tokens": statistics.fmean(f["visual_tokens"] for f in fields),
            "visual_tokens_kept": statistics.fmean(f["visual_tokens_kept"] for f in fields),
            "prompt_tokens": statistics.fmean(f["prompt_tokens"] for f in fields),
            "prefill_ms": statistics.median(f["prefill_ms"] for f in fields),
            "prefill_e2e_ms": statistics.median(f["prefill_e2e_ms"] for f in fields),
            "prefill_speedup": speedup("prefill_ms"),
            "prefill_e2e_speedup": speedup("prefill_e2e_ms"),
        }

    def _add_relative(self, summary: list[dict[str, Any]]) -> None:
        baselines = {r["mode"]: r for r in summary if r["pruner"] == BASELINE_PRUNER}
        for record in summary:
            base = baselines[record["mode"]]
            for metric, direction in self.protocol.headline.items():
                record[f"relative_{metric}"] = relative(record.get(metric), base.get(metric), direction)

    def _write(self, rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        _write_csv(self.out / "pages.csv", rows)
        flat = [{k: v for k, v in r.items() if not isinstance(v, dict)} for r in summary]
        _write_csv(self.out / "summary.csv", flat)
        meta = {**self.cache_key, "protocol": self.protocol.name, "pages": len(self.pages)}
        (self.out / "summary.json").write_text(json.dumps({**meta, "records": summary}, indent=2))


def _setting_fields(setting: Setting) -> dict[str, Any]:
    return {"mode": setting.mode, "pruner": setting.pruner, "retention": setting.retention}


def _stats_fields(stats: dict[str, Any]) -> dict[str, Any]:
    latency = stats["latency_ms"]
    return {
        "retention_used": stats["retention"],
        "visual_tokens": stats["visual_tokens"],
        "visual_tokens_kept": stats["visual_tokens_kept"],
        "prompt_tokens": stats["prompt_tokens"],
        "output_tokens": stats["output_tokens"],
        "prefill_ms": latency["prefill"],
        "prefill_e2e_ms": sum(latency.get(stage, 0.0) for stage in PREFILL_STAGES),
    }


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def print_summary(protocol: Protocol, summary: list[dict[str, Any]]) -> None:
    """One line per setting: its scores, each relative to the unpruned model of its mode, and its speed."""
    metrics = list(protocol.headline)
    head = f"{'mode':>7} {'pruner':>9} {'ret':>6} {'kept':>6} " + " ".join(f"{m[:13]:>13}" for m in metrics)
    print(head + f" {'x prefill':>9} {'x e2e':>6}")
    for r in summary:
        cells = []
        for m in metrics:
            value, rel = r.get(m), r.get(f"relative_{m}")
            cells.append(
                f"{'-' if value is None else f'{value:.3f}'}({'-' if rel is None else f'{rel:.3f}'})".rjust(13)
            )
        speed, e2e = (f"{x:.3f}" if x is not None else "-" for x in (r["prefill_speedup"], r["prefill_e2e_speedup"]))
        print(
            f"{r['mode']:>7} {r['pruner']:>9} {r['retention']!s:>6} {r['retention_used']:>6.3f} "
            + " ".join(cells)
            + f" {speed:>9} {e2e:>6}"
        )
    print("each score is shown as value(relative to the unpruned model of its mode)")
    if summary and summary[0]["prefill_speedup"] is None:
        print(f"speedups are shown for runs of at least {MIN_TIMED_PAGES} pages (settings warmed up, pages in rounds)")


def plot_summary(protocol: Protocol, summary: list[dict[str, Any]], path: Path, title: str) -> None:
    """Each headline metric's relative score against retention used; the prefill speedup on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    speed_axis = ax.twinx()
    for mode in dict.fromkeys(r["mode"] for r in summary):
        for pruner in dict.fromkeys(r["pruner"] for r in summary if r["mode"] == mode):
            group = sorted(
                (r for r in summary if r["mode"] == mode and r["pruner"] == pruner), key=lambda r: r["retention_used"]
            )
            for metric in protocol.headline:
                points = [
                    (r["retention_used"], r[f"relative_{metric}"])
                    for r in group
                    if r.get(f"relative_{metric}") is not None
                ]
                if points:
                    ax.plot(*zip(*points, strict=True), "o-", label=f"{mode} {pruner} {metric}", markersize=3)
            speed = [(r["retention_used"], r["prefill_speedup"]) for r in group if r["prefill_speedup"]]
            if speed and pruner != BASELINE_PRUNER:
                speed_axis.plot(*zip(*speed, strict=True), "x:", color="grey", label=f"{mode} {pruner} prefill speedup")
    if protocol.name == "omnidocbench":
        ax.plot(*PAPER_POINT, "r*", markersize=12, label="paper: RTPrune, Large")
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_xlabel("visual tokens kept / total (mean)")
    ax.set_ylabel("score relative to unpruned (same mode)")
    speed_axis.set_ylabel("prefill speedup vs unpruned (median)")
    ax.set_title(title, fontsize=9)
    handles = ax.get_legend_handles_labels()
    extra = speed_axis.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=6, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def score_predictions(protocol: Protocol, pages: list[EvalPage], folder: Path, out: Path) -> dict[str, Any]:
    """Score a folder of per-page markdown (``<page_id>.md``, the benchmark's naming) without a model.

    Pages without a prediction are listed and left out, as the benchmark's evaluator does; the
    summary says how many. Writes ``pages.csv`` and ``summary.json`` to ``out``."""
    scored, missing, rows = [], [], []
    for page in pages:
        path = find_prediction(folder, page.page_id)
        if path is None:
            missing.append(page.page_id)
            continue
        score = protocol.score(page, path.read_text(encoding="utf-8"))
        scored.append(score)
        rows.append({**protocol.record(score), "page": page.page_id})
    if not scored:
        raise ValueError(f"no prediction in {folder} for any of the {len(pages)} pages (expected <image stem>.md)")
    summary = {"protocol": protocol.name, **protocol.summarize(scored), "missing_predictions": missing}
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "pages.csv", rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def print_scores(protocol: Protocol, summary: dict[str, Any]) -> None:
    """A scored folder's headline numbers, then any breakdowns the protocol gives."""
    print(
        f"{protocol.name}: {summary['pages']} pages scored, {len(summary['missing_predictions'])} without a prediction"
    )
    if summary.get("match"):  # OmniDocBench: how the blocks were matched (quick is the leaderboard's)
        timed_out = summary.get("pages_quick_match_timed_out") or 0
        print(f"  matched {summary['match']}" + (f" ({timed_out} pages past quick_match's 30 s)" if timed_out else ""))
    for metric in protocol.headline:
        value = summary.get(metric)
        print(f"  {metric:<22} {'not computed' if value is None else f'{value:.4f}'}")
    for key, value in summary.items():
        if isinstance(value, dict) and value:
            print(f"  {key}:")
            for name, number in value.items():
                print(f"    {name:<40} {'-' if number is None else f'{number:.4f}'}")
