"""rtprune-ocr: DeepSeek-OCR with RTPrune visual-token pruning. `serve` starts the HTTP service, `ocr FILE`
reads one image or PDF, `eval` and `loadtest` measure accuracy and load."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import ValidationError


def _retention(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("retention must be a number in (0, 1] or 'auto'") from None


def _page_range(value: str) -> tuple[int, int | None]:
    from service.inputs import parse_page_range

    try:
        return parse_page_range(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from service.engine.names import DEFAULT_MODEL, RANDOM_PRESETS

    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id, local checkpoint directory, or a random preset: {', '.join(RANDOM_PRESETS)}",
    )
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument(
        "--vllm-url", help="decode on this vLLM server (serving the same checkpoint with --enable-prompt-embeds)"
    )


def _add_option_arguments(parser: argparse.ArgumentParser, names: Sequence[str], **defaults) -> None:
    """One flag per field of the options model (the doors' own declaration), its choices and default
    shown; unset flags stay out of the chosen fields, as an unset form field does. ``defaults`` are the
    command's own defaults where they differ from a page's (e.g. eval's mode)."""
    from service.engine.options import OcrOptions

    for name in names:
        field = OcrOptions.model_fields[name]
        default = defaults.get(name, field.default)
        options: dict = {"dest": name, "default": defaults.get(name)}
        choices = _literal_choices(field.annotation) or _enum_choices(field.annotation)
        if name == "retention":
            options["type"], options["metavar"] = _retention, "{0..1,auto}"
        elif choices:  # shown, and checked by the options model: the error reads as every door's
            options["metavar"] = "{" + ",".join(str(c) for c in choices) + "}"
        else:
            options["type"], options["metavar"] = (int, "INT") if field.annotation is int else (str, "TEXT")
        shown = "unset" if default is None else getattr(default, "value", default)
        description = (field.description or name).replace("%", "%%")
        parser.add_argument(f"--{name.replace('_', '-')}", help=f"{description} [default: {shown}]", **options)


def _enum_choices(annotation) -> tuple | None:
    """The values of an enum-typed field (mode, task, positions), else None."""
    import enum

    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return tuple(m.value for m in annotation)
    return None


def _add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ServiceSettings field; unset flags leave the environment (or the default) in charge."""
    from service.settings import ServiceSettings

    for name, field in ServiceSettings.model_fields.items():
        env = f"RTPRUNE_{name.upper()}"
        default = "unset" if field.default is None or name == "api_key" else str(field.default)
        options: dict = {"dest": name, "default": argparse.SUPPRESS}
        choices = _literal_choices(field.annotation)
        if field.annotation is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif choices:
            options["choices"] = choices
        else:
            options["metavar"] = _metavar(field.annotation)
        description = (field.description or name).replace("%", "%%")
        parser.add_argument(f"--{name.replace('_', '-')}", help=f"{description} [{env}; default {default}]", **options)


def _literal_choices(annotation) -> tuple | None:
    """The values of a ``Literal[...]`` or ``Literal[...] | None`` field, else None."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
    return typing.get_args(kinds[0]) if len(kinds) == 1 and typing.get_origin(kinds[0]) is Literal else None


def _metavar(annotation) -> str:
    """INT, SECONDS, PATH, ... from a field's type, for --help."""
    kinds = {int, float, str, Path}
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    kind = next((a for a in args if a in kinds), str)
    return {int: "INT", float: "NUMBER", Path: "PATH"}.get(kind, "TEXT")


OCR_FLAGS = (
    "mode", "task", "ref", "prompt", "pruner", "retention", "positions", "max_crops",
    "max_new_tokens", "ngram_size", "ngram_window",
)  # every page option but the web page's token map


# labelled pages as `eval --protocol` reads them and `synth --format` writes them
PAGE_LAYOUTS = {
    "markdown": "page images with the truth as a same-stem .md beside each (page.png + page.md)",
    "omnidocbench": "OmniDocBench.json + images/",
    "fox": "en_page_ocr.json + en_pdf_png/",
}


def _add_layout_argument(parser: argparse.ArgumentParser, flag: str, what: str) -> None:
    layouts = "; ".join(f"{name}: {layout}" for name, layout in PAGE_LAYOUTS.items())
    parser.add_argument(
        flag, choices=list(PAGE_LAYOUTS), default="markdown", help=f"{what}: {layouts} [default: %(default)s]"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtprune-ocr", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)

    ocr = commands.add_parser("ocr", help="OCR an image or a PDF and print markdown (or --json)")
    ocr.add_argument("image", help="path to an image (PNG, JPEG, WebP, TIFF, BMP, GIF) or a PDF")
    _add_model_arguments(ocr)
    _add_option_arguments(ocr, OCR_FLAGS)
    ocr.add_argument(
        "--page",
        "--pages",
        dest="page",
        type=_page_range,
        default=None,
        metavar="RANGE",
        help="PDF pages, as the API takes them: '3', '2-5' or '2-' (1-based) [default: every page]",
    )
    ocr.add_argument("--json", action="store_true", help="print one JSON object per page: markdown, text, boxes, stats")
    ocr.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="INT",
        help="torch CPU threads; on a shared host give each process its share [default: the CPUs it may use]",
    )

    convert = commands.add_parser(
        "convert", help="convert files, folders and globs of PDFs and images to markdown; resumable"
    )
    _add_model_arguments(convert)
    _add_option_arguments(convert, OCR_FLAGS)
    from service.convert.command import add_arguments as add_convert_arguments

    add_convert_arguments(convert)

    serve = commands.add_parser("serve", help="start the HTTP service; every flag is also an RTPRUNE_* variable")
    _add_settings_arguments(serve)
    evaluate = commands.add_parser(
        "eval", help="accuracy the benchmarks' way (OmniDocBench, Fox) vs retention, relative to unpruned"
    )
    _add_layout_argument(evaluate, "--protocol", "how --data is laid out and scored")
    evaluate.add_argument(
        "--data", type=Path, required=True, help="the benchmark's JSON (or the folder holding it), or the page folder"
    )
    evaluate.add_argument(
        "--predictions", type=Path, metavar="DIR", help="score these <image stem>.md files; runs no model"
    )
    evaluate.add_argument(
        "--url", help="run the grid against this running service (POST /v1/ocr) instead of in this process"
    )
    evaluate.add_argument(
        "--api-key", metavar="KEY", help="the service's API key, sent as a Bearer token with --url [default: none]"
    )
    _add_model_arguments(evaluate)
    evaluate.add_argument(
        "--modes", "--mode", dest="modes", default="large", help="comma-separated [default: %(default)s]"
    )
    evaluate.add_argument(
        "--pruners", default="rtprune,norm,random,divprune", help="comma-separated [default: %(default)s]"
    )
    evaluate.add_argument(
        "--retention", default="1.0,0.9,0.8425,0.7,auto", help="comma-separated grid [default: %(default)s]"
    )
    evaluate.add_argument(
        "--match",
        choices=("quick", "simple"),
        default="quick",
        help="OmniDocBench's matching: quick (its default, the leaderboard's) or simple [default: %(default)s]",
    )
    evaluate.add_argument("--limit", type=int, metavar="N", help="first N pages only [default: all]")
    evaluate.add_argument("--max-new-tokens", type=int, default=8192, metavar="INT", help="[default: %(default)s]")
    evaluate.add_argument("--out", type=Path, required=True, help="folder for pages.csv, summary.json/.csv, the plot")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")

    synth = commands.add_parser("synth", help="write synthetic labelled pages (image + markdown)")
    synth.add_argument("--out", type=Path, required=True, help="folder to write to")
    synth.add_argument("--n", type=int, default=20, help="pages [default: %(default)s]")
    synth.add_argument("--seed", type=int, default=0, help="[default: %(default)s]")
    _add_layout_argument(synth, "--format", "how the pages are written")

    load = commands.add_parser("loadtest", help="locust load test, headless; starts a tiny server unless --host")
    load.add_argument("--users", type=int, default=4, help="concurrent users [default: %(default)s]")
    load.add_argument(
        "--duration",
        type=int,
        default=20,
        help="seconds; make it several times one request's latency, or nothing is measured [default: %(default)s]",
    )
    load.add_argument("--out", type=Path, default=Path("load-report"), help="[default: %(default)s]")
    load.add_argument("--host", help="URL of a running service (default: start one on the tiny preset)")
    load.add_argument("--locustfile", type=Path, default=None, help="default: docker/locustfile.py of the checkout")
    return parser


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
