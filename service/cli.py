"""rtprune-ocr: DeepSeek-OCR with RTPrune visual-token pruning. `serve` starts the HTTP service, `ocr FILE`
reads one image or PDF, `eval` and `loadtest` measure accuracy and load."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from service.arguments import OCR_FLAGS, build_parser


def run_ocr(args: argparse.Namespace) -> int:
    from service.engine.options import RANDOM_TOKEN_CAP, resolve_options
    from service.inputs import UploadError, open_document

    chosen = {name: getattr(args, name) for name in OCR_FLAGS if getattr(args, name) is not None}
    try:  # the options and the file first: a mistake is reported at once, before torch and the model load
        resolve_options(chosen)
        with open(args.image, "rb") as handle:
            document = open_document(handle.read(), page_range=args.page)
    except ValidationError as exc:
        print(f"error: {readable(exc)}", file=sys.stderr)
        return 2
    except UploadError as exc:
        print(f"error: {args.image}: {exc.message}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from service.engine import RANDOM_WEIGHTS_WARNING, OCREngine
    from service.engine.page import PageTask
    from service.engine.stats import StageTimer
    from service.schemas import PAGE_SEPARATOR
    from service.settings import apply_threads

    apply_threads(args.threads)
    engine = OCREngine.load(args.model, device=args.device, dtype=args.dtype, vllm_url=args.vllm_url)
    try:
        # the doors' one call: this model's defaults and checks (and the random presets' token cap)
        options, notes = engine.resolve_options(chosen, random_cap=RANDOM_TOKEN_CAP)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in ([RANDOM_WEIGHTS_WARNING.format(name=engine.name)] if engine.random_weights else []) + notes:
        print(f"warning: {note}", file=sys.stderr)
    tasks = [PageTask(page, options, StageTimer(engine.device)) for page in document.pages()]
    results = engine.run_batch(tasks)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        print(f"error: {failed[0]}", file=sys.stderr)
        return 1
    for number, result in zip(document.numbers, results, strict=True):
        if args.json:
            page = result.model_dump(mode="json", exclude={"token_map", "preview"})  # the web page's opt-in fields
            print(json.dumps({"page": number, **page}, ensure_ascii=False))
        s = result.stats
        print(
            f"[page {number}: {s.visual_tokens_kept}/{s.visual_tokens} visual tokens kept, "
            f"{s.output_tokens} tokens out, {s.latency_ms.total:.0f} ms]",
            file=sys.stderr,
        )
    if not args.json:
        print(PAGE_SEPARATOR.join(result.markdown for result in results))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from service.convert.command import run
    from service.engine.options import resolve_options

    chosen = {name: getattr(args, name) for name in OCR_FLAGS if getattr(args, name) is not None}
    try:  # the options first: a mistake is reported at once, before any file is read or torch imported
        resolve_options(chosen)
    except ValidationError as exc:
        print(f"error: {readable(exc)}", file=sys.stderr)
        return 2
    return run(args, chosen)


def readable(exc: ValidationError) -> str:
    """A pydantic error in the sentence every door answers, fields named as flags (``--max-new-tokens``)."""
    from service.errors import validation_message

    return validation_message(exc.errors(), name=lambda field: "--" + field.replace("_", "-"))


def run_serve(args: argparse.Namespace) -> int:
    from service.settings import ServiceSettings

    overrides = {k: v for k, v in vars(args).items() if k in ServiceSettings.model_fields}  # flags beat env
    try:
        settings = ServiceSettings(**overrides)
    except ValidationError as exc:
        print(f"error: invalid settings: {readable(exc)}", file=sys.stderr)
        return 2
    if settings.replicas is None:
        from service.server import serve

        serve(settings)
        return 0
    try:
        from service.ray_serve import run
    except ModuleNotFoundError as exc:
        if exc.name != "ray" and not (exc.name or "").startswith("ray."):
            raise
        print('error: --replicas runs on Ray Serve: pip install "rtprune-ocr[ray]"', file=sys.stderr)
        return 2
    run(settings)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from pruning import PRUNERS
    from service.engine.options import resolve_options
    from service.evaluation.harness import parse_retentions, print_scores, score_predictions, settings_grid
    from service.evaluation.protocols import PROTOCOLS

    protocol = PROTOCOLS[args.protocol](**({"match": args.match} if args.protocol == "omnidocbench" else {}))
    try:
        pages = protocol.load(args.data, args.limit)
        if args.predictions is not None:
            summary = score_predictions(protocol, pages, args.predictions, args.out)
            print_scores(protocol, summary)
            print(f"wrote {args.out / 'pages.csv'}, {args.out / 'summary.json'}")
            return 0
        pruners = [p.strip() for p in args.pruners.split(",") if p.strip()]
        if unknown := set(pruners) - set(PRUNERS):
            raise ValueError(f"unknown pruners {sorted(unknown)}; choose from {', '.join(PRUNERS)}")
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        for mode in modes:
            resolve_options({"mode": mode})  # before the model loads
        grid = settings_grid(modes, pruners, parse_retentions(args.retention))
    except ValidationError as exc:
        print(f"error: {readable(exc)}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"error: {exc.name} is missing: pip install 'rtprune-ocr[eval]'", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _run_grid(args, protocol, pages, grid)


def _run_grid(args: argparse.Namespace, protocol, pages, grid) -> int:
    from service.engine import RANDOM_WEIGHTS_WARNING, OCREngine
    from service.evaluation.harness import (
        Evaluation,
        PageFailed,
        engine_runner,
        plot_summary,
        print_summary,
        ready_service_info,
        service_client,
        url_runner,
    )

    if args.url:
        client = service_client(args.url, args.api_key)
        try:
            info = ready_service_info(client)
            if missing := sorted({s.mode for s in grid} - set(info["modes"])):
                raise ValueError(f"{args.url} serves modes {', '.join(info['modes'])}, not {', '.join(missing)}")
        except (RuntimeError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        name, random_weights = info["model"], bool(info["random_weights"])
        runner = url_runner(client, args.max_new_tokens)
        key = {"url": args.url, "model": name, "max_new_tokens": args.max_new_tokens}
    else:
        engine = OCREngine.load(args.model, device=args.device, dtype=args.dtype, vllm_url=args.vllm_url)
        name, random_weights = engine.name, engine.random_weights
        runner = engine_runner(engine, args.max_new_tokens)
        key = {"model": name, "decoder": engine.decoder_name, "max_new_tokens": args.max_new_tokens}
    if random_weights:
        print("warning: " + RANDOM_WEIGHTS_WARNING.format(name=name), file=sys.stderr)
    key["random_weights"] = random_weights
    evaluation = Evaluation(protocol, pages, grid, runner, cache_key=key, out=args.out)
    try:
        summary = evaluation.run(progress=not args.no_progress)
    except PageFailed as exc:
        print(f"error: {exc}; the pages done so far are kept: run the same command again to go on", file=sys.stderr)
        return 1
    print_summary(protocol, summary)
    weights = "random weights: meaningless text" if random_weights else "real weights"
    title = f"{name} ({weights}), {protocol.name}, {len(pages)} pages"
    plot_summary(protocol, summary, args.out / "relative.png", title)
    names = ("pages.csv", "summary.json", "summary.csv", "relative.png", "predictions/")
    written = ", ".join(str(args.out / name) for name in names)
    print(f"wrote {written}")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from service.evaluation.synth import write_pages
    from service.evaluation.synth_benchmarks import write_fox, write_omnidocbench

    if args.format == "omnidocbench":
        print(f"wrote {args.n} pages: {write_omnidocbench(args.out, args.n, args.seed)} and {args.out / 'images'}")
    elif args.format == "fox":
        print(f"wrote {args.n} pages: {write_fox(args.out, args.n, args.seed)} and {args.out / 'en_pdf_png'}")
    else:
        paths = write_pages(args.out, args.n, args.seed)
        print(f"wrote {len(paths)} pages with markdown to {args.out}")
    return 0


def run_load(args: argparse.Namespace) -> int:
    from service.loadtest import LOCUSTFILE, run_loadtest

    return run_loadtest(args.users, args.duration, args.out, host=args.host, locustfile=args.locustfile or LOCUSTFILE)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per readiness poll or vLLM request
    commands = {
        "ocr": run_ocr,
        "convert": run_convert,
        "serve": run_serve,
        "loadtest": run_load,
        "eval": run_eval,
        "synth": run_synth,
    }
    try:
        return commands[args.command](args)
    except Exception as exc:
        # imported here: a model error comes only after torch was imported, and a mistake in the input
        # must be reported before torch is (seconds on a busy machine)
        from service.engine import ModelLoadError

        if not isinstance(exc, ModelLoadError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
