"""`rtprune-ocr convert INPUT... --out DIR`: what the command does, start to end.

1. Find the documents; a document already converted with the same model and options is skipped
   (nothing is loaded when nothing is left to do).
2. Open each remaining document (every limit checked, nothing rendered): a broken, encrypted or
   oversized file is recorded as failed, with the reason every door gives, and the run goes on.
3. Convert the pages not finished yet — in this process through the service's scheduler, or with
   ``--url`` as jobs on running services — writing each page as it finishes.
4. Write each finished document's ``.md`` and ``.json``, then ``report.json``; exit 0 only when
   every document converted.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .sources import Source, find_sources
from .workspace import Workspace, options_key

MAX_PAGES = 100_000  # a corpus's PDF may be long: the service's per-request page limit does not apply


@dataclass
class Outcome:
    """One document's line in the report."""

    name: str
    source: str
    state: str = "pending"  # converted | skipped | failed
    pages: int = 0
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    error: dict[str, str] | None = None

    def record(self) -> dict[str, Any]:
        keep = ("output_tokens", "visual_tokens", "visual_tokens_kept", "retention", "prompt_tokens")
        return {
            "name": self.name,
            "source": self.source,
            "state": self.state,
            "pages": self.pages,
            "seconds": round(self.seconds, 3),
            **{k: self.stats[k] for k in keep if k in self.stats},
            "error": self.error,
        }


class Progress:
    """A bar on a terminal (pages, documents, failures, pages/s and ETA); otherwise a line per document."""

    def __init__(self, pages: int, documents: int, quiet: bool) -> None:
        self.quiet, self.documents, self.done, self.failed = quiet, documents, 0, 0
        self.bar = tqdm(total=pages, unit="page", disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)

    def pages(self, count: int = 1) -> None:
        self.bar.update(count)

    def document(self, outcome: Outcome) -> None:
        self.done += 1
        self.failed += outcome.state == "failed"
        self.bar.set_postfix_str(f"{self.done}/{self.documents} documents, {self.failed} failed")
        if self.bar.disable and not self.quiet:
            what = f"failed: {outcome.error['message']}" if outcome.error else f"{outcome.pages} pages"
            print(f"[{self.done}/{self.documents}] {outcome.name}: {what} ({outcome.seconds:.1f} s)", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def run(args: argparse.Namespace, chosen: dict[str, Any]) -> int:
    started = time.monotonic()
    sources, problems = find_sources(args.inputs)
    workspace = Workspace(args.out)
    outcomes = [Outcome(given, given, "failed", error={"code": "not_found", "message": why}) for given, why in problems]
    form = {name: str(value) for name, value in chosen.items()}
    if args.url:
        converted = _run_remote(args, sources, workspace, form)
    else:
        converted = _run_local(args, sources, workspace, chosen)
    outcomes += converted
    report = {
        "out": str(args.out),
        "model": args.model if not args.url else None,
        "urls": args.url or None,
        "options": form,
        "documents": [o.record() for o in outcomes],
        **{state: sum(o.state == state for o in outcomes) for state in ("converted", "skipped", "failed")},
        "pages": sum(o.pages for o in outcomes if o.state == "converted"),
        "seconds": round(time.monotonic() - started, 3),
    }
    path = workspace.write_report(report)
    failed = [o for o in outcomes if o.state == "failed"]
    if not args.quiet:
        print(
            f"{report['converted']} converted ({report['pages']} pages), {report['skipped']} already done, "
            f"{len(failed)} failed in {report['seconds']:.1f} s; report: {path}",
            file=sys.stderr,
        )
    for outcome in failed:
        print(f"failed: {outcome.source}: {outcome.error['message']}", file=sys.stderr)
    return 1 if failed else 0


def _run_local(args, sources: list[Source], workspace: Workspace, chosen: dict[str, Any]) -> list[Outcome]:
    from service.engine.options import RANDOM_TOKEN_CAP
    from service.inputs import UploadError, open_document

    key = options_key(args.model, chosen)
    outcomes, todo = [], []
    for source in sources:
        outcome = Outcome(source.name, str(source.path))
        outcomes.append(outcome)
        if workspace.is_done(source, key) and not args.force:
            outcome.state = "skipped"
            continue
        try:
            document = open_document(source.path.read_bytes(), max_pdf_pages=MAX_PAGES)
        except (UploadError, OSError) as exc:
            _failed(workspace, source, outcome, exc, "unreadable")
            continue
        todo.append((source, outcome, document))
    if not todo:
        return outcomes  # nothing to convert: no model is loaded

    from service.convert.local import LocalRunner
    from service.engine import RANDOM_WEIGHTS_WARNING, OCREngine
    from service.settings import ServiceSettings, apply_threads

    apply_threads(args.threads)
    engine = OCREngine.load(args.model, device=args.device, dtype=args.dtype, vllm_url=args.vllm_url)
    options, notes = engine.resolve_options(chosen, random_cap=RANDOM_TOKEN_CAP)
    warnings = ([RANDOM_WEIGHTS_WARNING.format(name=engine.name)] if engine.random_weights else []) + notes
    for note in warnings:
        print(f"warning: {note}", file=sys.stderr)
    meta = {"model": engine.name, "random_weights": engine.random_weights, "options": options.model_dump(mode="json")}
    meta["warnings"] = warnings
    settings = ServiceSettings(model=args.model, device=args.device)
    started = time.monotonic()
    plans = []
    for source, outcome, document in todo:
        finished = workspace.begin(source, key, force=args.force)
        remaining = [i for i, number in enumerate(document.numbers) if number not in finished]
        plans.append((source, outcome, document.select(remaining), finished))
    progress = Progress(sum(len(plan[2]) for plan in plans), len(plans), args.quiet)
    works = [_work(workspace, *plan, options, meta, started, progress) for plan in plans]
    runner = LocalRunner(engine, settings.scheduler_config())
    try:
        for work in [w for w in works if not len(w.document)]:  # every page was done before: write it
            work.on_end(None)
        runner.run([w for w in works if len(w.document)])
    finally:
        runner.stop()
        progress.close()
    return outcomes


def _work(workspace, source, outcome, document, finished, options, meta, started, progress):
    """The document's pages still to do, with what to do as each page and the document finish."""
    from service.convert.local import Work

    pages = dict(finished)

    def on_page(number, result) -> None:
        pages[number] = workspace.page_done(source, number, result)
        progress.pages()

    def on_end(error) -> None:
        outcome.seconds = time.monotonic() - started
        if error is not None:
            _failed(workspace, source, outcome, error, "error")
        else:
            _converted(workspace, source, outcome, pages, meta)
        progress.document(outcome)

    return Work(source.name, document, options, on_page, on_end)


def _run_remote(args, sources: list[Source], workspace: Workspace, form: dict[str, str]) -> list[Outcome]:
    from service.convert.remote import RemoteFailure, RemoteRunner
    from service.engine import PageResult

    runner = RemoteRunner(args.url, args.api_key or _api_key_from_environment(), form)
    try:
        key = options_key(f"{runner.model()}@{','.join(args.url)}", form)
    except (RemoteFailure, OSError) as exc:
        print(f"error: {args.url[0]}: {exc}", file=sys.stderr)
        runner.close()
        error = {"code": getattr(exc, "code", "unreachable"), "message": str(exc)}
        return [Outcome(s.name, str(s.path), "failed", error=error) for s in sources]
    outcomes = [Outcome(s.name, str(s.path)) for s in sources]
    todo = []
    for source, outcome in zip(sources, outcomes, strict=True):
        if workspace.is_done(source, key) and not args.force:
            outcome.state = "skipped"
        else:
            todo.append((source, outcome))
    progress = Progress(0, len(todo), args.quiet)

    def convert(source: Source, outcome: Outcome) -> None:
        started, seen = time.monotonic(), [0]

        def on_progress(done: int) -> None:
            progress.pages(done - seen[0])
            seen[0] = done

        workspace.begin(source, key, force=args.force)
        try:
            answer = runner.convert(source.path, on_progress)
        except (RemoteFailure, OSError) as exc:
            outcome.seconds = time.monotonic() - started
            _failed(workspace, source, outcome, exc, "unreachable")
        else:
            pages = {}
            for page in answer["pages"]:
                number = page.pop("page")
                pages[number] = workspace.page_done(source, number, PageResult.model_validate(page))
            meta = {k: answer[k] for k in ("model", "random_weights")}
            meta |= {"options": {k: answer[k] for k in ("mode", "task", "pruner", "retention")}}
            meta["warnings"] = answer["warnings"]
            outcome.seconds = time.monotonic() - started
            _converted(workspace, source, outcome, pages, meta)
        progress.document(outcome)

    try:
        with ThreadPoolExecutor(max_workers=args.concurrency * len(args.url)) as pool:
            list(pool.map(lambda item: convert(*item), todo))
    finally:
        progress.close()
        runner.close()
    return outcomes


def _api_key_from_environment() -> str | None:
    """``RTPRUNE_API_KEY``, through the settings (the one reader of the environment): the key a service on
    this host was started with is the key its clients send."""
    from service.settings import ServiceSettings

    key = ServiceSettings().api_key
    return key.get_secret_value() if key else None


def _converted(workspace: Workspace, source: Source, outcome: Outcome, pages: dict, meta: dict[str, Any]) -> None:
    outcome.stats = workspace.finish(source, pages, meta, outcome.seconds)
    outcome.state, outcome.pages = "converted", len(pages)


def _failed(workspace: Workspace, source: Source, outcome: Outcome, error: Exception, code: str) -> None:
    """The document failed: the error's own code and message (the error table's), else ``code`` and its text."""
    message = getattr(error, "message", None) or str(error)
    outcome.state, outcome.error = "failed", {"code": getattr(error, "code", None) or code, "message": message}
    workspace.fail(source, message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's own flags (the model and page options come from the CLI's shared builders)."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="PDFs and images: files, folders (recursive), globs")
    parser.add_argument("--out", type=Path, required=True, help="output folder (and the state a rerun resumes from)")
    parser.add_argument(
        "--url", action="append", help="convert on this running service instead of in this process (repeatable)"
    )
    parser.add_argument(
        "--api-key", metavar="KEY", help="the services' API key, with --url [default: RTPRUNE_API_KEY, else none]"
    )
    parser.add_argument(
        "--concurrency", type=int, default=4, metavar="INT", help="documents in flight per --url [default: 4]"
    )
    parser.add_argument("--force", action="store_true", help="convert every document again, finished or not")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("--threads", type=int, default=None, metavar="INT", help="torch CPU threads [default: all]")
