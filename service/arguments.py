"""The command line's arguments: one subcommand per use, every setting a `serve` flag and every per-page
option an `ocr` and `convert` flag, both derived from their pydantic models (so a new setting or option
is a flag without being written twice). Imports nothing heavy: `rtprune-ocr --help` answers at once."""

from __future__ import annotations

import argparse
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Literal


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
    "mode",
    "task",
    "ref",
    "prompt",
    "pruner",
    "retention",
    "positions",
    "max_crops",
    "max_new_tokens",
    "ngram_size",
    "ngram_window",
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
