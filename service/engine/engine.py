"""OCREngine: one loaded model, and the walk of one page from image to result.

upload image -> preprocess -> encode (vision + projector) -> prune -> assemble prompt
-> generate -> postprocess. Each step is a module of this package; this file only
strings them together and times them. It offers the walk whole (:meth:`OCREngine.run`,
:meth:`OCREngine.run_batch`, for the CLI, the evaluation harness and the benchmarks) and in
steps for the HTTP service's scheduler, which joins pages between decode steps:
:meth:`OCREngine.prepare_on_host` (the host's work, on the scheduler's preprocessing threads) ->
:meth:`OCREngine.prepare` (vision, pruning of all pages at once, prompts) -> a decoding batch's
join/step/remove -> :meth:`OCREngine.page_result`. Both run the same functions, so every number
measures the served path. The engine knows nothing of HTTP or queues.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pruning import PruneResult

from .assemble import assemble_prompt
from .decode.batch import RunningBatch
from .decode.contract import DecodeBatch
from .decode.generate import generate_batch, prompt_problem
from .decode.sequence import Sequence, never
from .decode.vllm_decoder import VllmServer, check_options
from .device import DeviceFacts, device_facts
from .layout import visual_token_count
from .model import OcrModel, VisualBlock
from .names import DEFAULT_MODEL, MODES_BY_VERSION, Positions
from .options import OcrOptions, resolve_options
from .page import PageResult, PageTask, PreparedPage, PromptTooLong
from .preprocess import PreparedImage, preprocess
from .prompts import tokenize_prompt
from .prune_pages import page_pruner, prune_inputs, prune_pages
from .result import page_result
from .stats import StageTimer, shared_stage
from .weights.loading import load_model

log = logging.getLogger(__name__)
MAX_VISION_BYTES = 4 * 2**30  # per vision call: ~4 Large pages, ~10 Base pages (see OcrModel.vision_bytes)


def _pinned(page: PreparedImage) -> PreparedImage:
    """The views in page-locked memory: their copy to the GPU does not make the host wait."""
    tiles = page.tiles.pin_memory() if page.tiles is not None else None
    return dataclasses.replace(page, global_view=page.global_view.pin_memory(), tiles=tiles)


def _without_pixels(block: VisualBlock) -> VisualBlock:
    """The block without its view tensors (12-40 MB a page, on the device): what :meth:`OCREngine.finish`
    needs when no token map is asked for is the features' count and the page size."""
    empty = block.global_view.new_empty(0)
    page = dataclasses.replace(block.page, global_view=empty, tiles=None)
    return dataclasses.replace(block, global_view=empty, page=page)


class OCREngine:
    """A loaded DeepSeek-OCR with RTPrune; create once per process with :meth:`load`."""

    def __init__(
        self, model: OcrModel, decoder: VllmServer | None = None, *, max_vision_bytes: int | None = MAX_VISION_BYTES
    ) -> None:
        self.model = model
        self.decoder = decoder  # None: the model's own decoder, in this process
        self.max_vision_bytes = max_vision_bytes  # one vision call's estimated transient memory at most

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        *,
        device: str | None = None,
        dtype: str | None = None,
        cache_dir: Path | None = None,
        vllm_url: str | None = None,
        vllm_timeout_s: float = 120.0,
        memory_fraction: float | None = None,
        max_vision_bytes: int | None = MAX_VISION_BYTES,
    ) -> OCREngine:
        """Load the model; with ``vllm_url`` its pages decode on that vLLM server (which must serve the
        same checkpoint), and the local decoder layers are freed. ``memory_fraction`` caps this
        process's share of the GPU (when a vLLM server shares it)."""
        loaded = load_model(model, device=device, dtype=dtype, cache_dir=cache_dir, memory_fraction=memory_fraction)
        ocr_model = OcrModel(loaded)
        engine = cls(ocr_model, max_vision_bytes=max_vision_bytes)
        log.info(
            "loaded %s (DeepSeek-OCR %s%s); %s",
            loaded.name,
            loaded.version,
            ", RANDOM weights" if loaded.random_weights else "",
            engine.facts.line(),
        )
        if vllm_url is None:
            return engine
        engine.decoder = VllmServer(vllm_url, timeout_s=vllm_timeout_s)
        engine.decoder.connect()
        ocr_model.release_decoder_layers()
        return engine

    @property
    def facts(self) -> DeviceFacts:
        """Device, GPU, torch and CUDA build, driver, dtype, attention and experts implementations."""
        return device_facts(self.model.device, self.model.dtype, self.model.text_config)

    @property
    def decoder_name(self) -> str:
        return "vllm" if self.decoder is not None else "transformers"

    def resolve_options(self, chosen: dict[str, Any], *, random_cap: int | None = None) -> tuple[OcrOptions, list[str]]:
        """The options a page runs with on this engine, from the fields a caller set, and notes on the
        chosen ones without effect; ValueError for anything this model or decoder cannot run (see
        :func:`.options.resolve_options`: every front door and the CLI make this one call)."""
        return resolve_options(
            chosen,
            version=self.version,
            random_weights=self.random_weights,
            decoder=self.decoder_name,
            check_decoder=self._check_decoder_options if self.decoder is not None else None,
            random_cap=random_cap,
        )

    @staticmethod
    def _check_decoder_options(options: OcrOptions) -> None:
        check_options(options.positions, options.guard())

    def detokenizer(self, skip_special_tokens: bool) -> Callable[[list[int]], str]:
        """Token ids -> text as a front door shows them, streamed or whole (the same function for both, so
        one request gets one text): end-of-text is never shown; ``skip_special_tokens`` also drops the
        grounding tags, as vLLM's option of that name does. The tokenizer stays in the engine."""
        tokenizer = self.model.tokenizer
        eos = tokenizer.eos_token_id
        return lambda tokens: tokenizer.decode([t for t in tokens if t != eos], skip_special_tokens=skip_special_tokens)

    @property
    def name(self) -> str:
        return self.model.loaded.name

    @property
    def random_weights(self) -> bool:
        return self.model.loaded.random_weights

    @property
    def version(self) -> str:
        return self.model.version

    @property
    def modes(self) -> list[str]:
        return [m.value for m in MODES_BY_VERSION[self.version]]

    def run(
        self,
        image: Image.Image,
        options: OcrOptions | None = None,
        *,
        should_stop: Callable[[], bool] | None = None,
        timer: StageTimer | None = None,
    ) -> PageResult:
        """OCR one page. ``should_stop`` is polled between decode steps (cancellation)."""
        task = PageTask(image, options or OcrOptions(), timer or StageTimer(self.model.device), should_stop or never)
        result = self.run_batch([task])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    @torch.inference_mode()
    def run_batch(self, tasks: list[PageTask]) -> list[PageResult | BaseException]:
        """OCR several pages together as one static batch: one vision call per global-view size,
        one padded prefill, one batched decode. Each page keeps its own options (mode, pruner,
        retention, ...), its own stop rules and its own statistics; a problem with one page is
        returned in its slot and does not disturb the others. (The HTTP service's scheduler uses
        :meth:`prepare`, a :class:`RunningBatch` and :meth:`finish` directly, so pages join
        between decode steps.)
        """
        prepared = self.prepare(tasks)
        sequences = [page.sequence for page in prepared if isinstance(page, PreparedPage)]
        generate_batch(self.model, sequences, self.new_batch())
        return [page if isinstance(page, BaseException) else self.page_result(page) for page in prepared]

    def page_result(self, page: PreparedPage) -> PageResult | BaseException:
        """A page whose sequence has stopped: its result, or why it failed (cancelled, NaN, ...)."""
        if isinstance(page.sequence.outcome, BaseException):
            return page.sequence.outcome
        return self.finish(page)

    def new_batch(self) -> DecodeBatch:
        """An empty running batch on this model (or on the vLLM server); pages join it after :meth:`prepare`."""
        return self.decoder.new_batch(self.model) if self.decoder is not None else RunningBatch(self.model)

    @torch.inference_mode()
    def prepare(self, tasks: list[PageTask]) -> list[PreparedPage | BaseException]:
        """Everything before the prefill, for several pages: preprocess, encode (one vision call
        per view size), prune and assemble each prompt. A page that fails gets its exception in
        its slot; a failed vision call is retried page by page so one bad page fails alone.
        """
        results: list[PreparedPage | BaseException | None] = [None] * len(tasks)
        pages: dict[int, PreparedImage] = {}
        tasks = list(tasks)
        for i, task in enumerate(tasks):
            try:
                tasks[i] = task = task if task.on_host_done else self.prepare_on_host(task)
                pages[i] = task.pixels
            except Exception as exc:  # bad options, an image PIL cannot convert, too long: this page only
                results[i] = exc
        blocks, failures = self._encode(pages, tasks)
        for i, exc in failures.items():
            results[i] = exc
        pruned = prune_pages({i: (block, tasks[i]) for i, block in blocks.items()})
        for i, block in blocks.items():
            try:
                if isinstance(pruned[i], BaseException):
                    raise pruned[i]
                results[i] = self.assemble_page(block, tasks[i], pruned[i])
            except Exception as exc:
                results[i] = exc
        return results  # type: ignore[return-value]  # every slot is filled

    @torch.inference_mode()
    def prepare_in_pieces(self, task: PageTask) -> Generator[None, None, PreparedPage]:
        """:meth:`prepare` for one page in pieces, yielding between them: each view of the vision encoder (the
        global view, then each tile), then pruning and the prompt. The scheduler runs a piece or a few between
        two decode steps while pages decode, so the pause a joining page causes is bounded by a piece, not
        by the page (its vision is then not batched with other pages': what a bounded pause costs)."""
        task = task if task.on_host_done else self.prepare_on_host(task)
        views = self.model.encode_in_pieces(task.pixels)
        while True:
            with task.timer.stage("vision"):
                try:
                    next(views)
                except StopIteration as done:
                    block = done.value
                    break
            yield
        yield  # pruning is a piece of its own
        with task.timer.stage("prune"):
            pruned = page_pruner(task)(*prune_inputs(block))
        return self.assemble_page(block, task, pruned)

    def prepare_on_host(self, task: PageTask, *, pixels_only: bool = False) -> PageTask:
        """A page's host work, done once: check its options, tokenize its prompt, render and preprocess its
        image, count its visual tokens, refuse a prompt with no room to generate. The service runs this on
        its preprocessing threads (``pixels_only``: the views stay uint8, pinned for a GPU, and are
        normalised on the device), so the thread that drives the model only launches model work."""
        text = task.options.validate_for_run(self.model.version)
        prompt = tokenize_prompt(self.model.tokenizer, text)
        with task.timer.host_stage("preprocess"):
            pixels = preprocess(
                task.image,
                task.options.mode,
                version=self.model.version,
                max_crops=task.options.max_crops,
                normalised=not pixels_only,
            )
            if pixels_only and self.device.type == "cuda":
                pixels = _pinned(pixels)
        image = task.image if task.options.token_map else None  # the views are all the page needs now
        n_visual = visual_token_count(pixels, self.model.version)
        task = dataclasses.replace(task, image=image, prompt=prompt, pixels=pixels, visual_tokens=n_visual)
        self._check_room(task)
        return task

    def _check_room(self, task: PageTask) -> None:
        """PromptTooLong before any model work when the unpruned prompt leaves no position to generate."""
        n_visual = task.visual_tokens
        length = task.prompt.length(n_visual)
        if task.options.positions == Positions.original and length >= self.model.max_positions:
            raise PromptTooLong(
                f"the prompt takes {length} positions (with {n_visual} visual tokens) of the model's "
                f"{self.model.max_positions}; nothing could be generated. Use a smaller mode or fewer tiles "
                "(max_crops), or positions=compact with a lower retention"
            )

    def assemble_page(self, block: VisualBlock, task: PageTask, pruned: PruneResult | None = None) -> PreparedPage:
        """Build one encoded page's prompt around what pruning kept (pruning it here when ``pruned`` is not
        given): the step after the vision encoder. (Benchmarks reuse one block for several retentions.)"""
        options = task.options
        if pruned is None:
            with task.timer.stage("prune"):
                pruned = page_pruner(task)(*prune_inputs(block))
        with task.timer.stage("assemble"):
            ids = task.prompt or tokenize_prompt(self.model.tokenizer, options.prompt_text())
            prompt = assemble_prompt(
                self.model.embed(torch.tensor(ids.ids(block.n_tokens), device=self.model.device)),
                ids.image_start,
                block.n_tokens,
                pruned.features,
                pruned.kept_indices,
                options.positions,
            )
        problem = prompt_problem(self.model, prompt)
        limit = self.decoder.max_model_len if self.decoder is not None else None
        if not problem and limit is not None and prompt.next_position >= limit:
            problem = f"the prompt takes {prompt.next_position} of the vLLM server's {limit} positions (max-model-len)"
        if problem:
            raise PromptTooLong(problem)
        sequence = Sequence(
            prompt, options.max_new_tokens, options.guard(), task.timer, task.should_stop, on_token=task.on_token
        )
        if not options.token_map:  # a page may wait and decode for a long time: hold no pixels meanwhile
            task, block = dataclasses.replace(task, image=None, pixels=None), _without_pixels(block)
        return PreparedPage(task, block, pruned, sequence)

    def _encode(
        self, pages: dict[int, PreparedImage], tasks: list[PageTask]
    ) -> tuple[dict[int, VisualBlock], dict[int, Exception]]:
        """Vision tower + projector, one call per global-view size; each page is charged the call's time.
        A call that fails with several pages is retried page by page, so a bad page fails alone."""
        groups: dict[tuple, list[int]] = {}
        for i, page in pages.items():
            groups.setdefault(tuple(page.global_view.shape), []).append(i)
        blocks: dict[int, VisualBlock] = {}
        failures: dict[int, Exception] = {}
        for members in groups.values():
            attempts = self._vision_calls(members, pages)[::-1]  # popped from the end: in order
            while attempts:
                group = attempts.pop()
                try:
                    with shared_stage([tasks[i].timer for i in group], "vision", self.model.device):
                        encoded = self.model.encode([pages[i] for i in group])
                    blocks.update(zip(group, encoded, strict=True))
                except Exception as exc:
                    if len(group) == 1:
                        failures[group[0]] = exc
                    else:
                        attempts += [[i] for i in group]
        return blocks, failures

    def _vision_calls(self, members: list[int], pages: dict[int, PreparedImage]) -> list[list[int]]:
        """Pages of one view size split into vision calls whose estimated transient memory stays within
        :attr:`max_vision_bytes` (a page larger than that still runs, alone)."""
        calls: list[list[int]] = []
        current: list[int] = []
        used = 0
        for i in members:
            need = self.model.vision_bytes(pages[i])
            if current and self.max_vision_bytes is not None and used + need > self.max_vision_bytes:
                calls.append(current)
                current, used = [], 0
            current.append(i)
            used += need
        return [*calls, current] if current else calls

    def finish(self, page: PreparedPage) -> PageResult:
        """The page's result once its sequence has finished: text, markdown, boxes, statistics."""
        return page_result(page, self.model.tokenizer, self.model.version)

    def warmup(self, *, every_mode: bool | None = None) -> None:
        """One small forward through every stage, so the first request does not pay for lazy init.

        ``every_mode`` (default: on a GPU) also runs each mode at its largest view, as many pages as one
        vision call may hold: the kernels of every shape are built, and the allocator has seen the vision
        encoder's transient peak before the KV budget is measured from the memory left free."""
        options, _ = self.resolve_options({"mode": MODES_BY_VERSION[self.version][0], "max_new_tokens": 2})
        self.run(Image.new("RGB", (64, 64), "white"), options)
        if not (self.device.type == "cuda" if every_mode is None else every_mode):
            return
        page = Image.new("RGB", (2048, 2048), "white")  # every mode's largest view; gundam's most tiles
        for mode in MODES_BY_VERSION[self.version]:
            options, _ = self.resolve_options({"mode": mode, "max_new_tokens": 2, "max_crops": 9})
            view = preprocess(page, mode, version=self.version, max_crops=9)
            fits = (self.max_vision_bytes or 0) // max(1, self.model.vision_bytes(view))
            tasks = [PageTask(page, options, StageTimer(self.device)) for _ in range(max(1, min(fits, 16)))]
            self.run_batch(tasks)

    @property
    def device(self) -> torch.device:
        return self.model.device
