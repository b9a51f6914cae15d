"""Joining the running batch, and the decode step: the scheduler's model-side half (see :mod:`.loop`).

Ready pages are prefilled into the batch while its KV footprint (rows x longest row, padding included)
stays within ``batch_tokens_limit``; a prefill that fails is retried with half the pages. While
interactive pages decode, a joining page's model work runs in pieces instead (a SAM layer of one view,
its pruning, a chunk of its prefill), about ``join_budget_ms`` of it between two steps, so the pause
between their tokens is bounded by a piece, not by the largest page. A decode step that fails evicts the
newest half of the batch, which rejoins later with the tokens it had.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.engine import OCREngine, OcrOptions, PageResult
from service.engine.decode.contract import DecodeBatch, PrefillsInChunks
from service.engine.page import PageTask, PreparedPage

from .config import SchedulerConfig
from .memory import after_failed_call
from .queue import PageRequest

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Preparing:
    """A page whose model work (each view of its vision encoder, then pruning) runs a piece at a time."""

    request: PageRequest
    index: int
    task: PageTask
    pieces: Generator[None, None, PreparedPage]


@dataclass(eq=False)
class Admitted:
    """A page that has been admitted: its request, its index there, and the engine's state for it."""

    request: PageRequest
    index: int
    page: PreparedPage

    @property
    def sequence(self):
        return self.page.sequence

    @property
    def prefill_tokens(self) -> int:
        """What joining prefills: the prompt, plus the tokens an evicted page had already generated."""
        return self.page.prompt_tokens + len(self.sequence.tokens)


def line_up(line: deque, page: Admitted | Preparing) -> None:
    """Add a page to a line of pages (ready, or being prepared): an interactive page goes ahead of every batch
    page, behind the interactive ones already there."""
    if page.request.priority == "interactive":
        for position, other in enumerate(line):
            if other.request.priority == "batch":
                line.insert(position, page)
                return
    line.append(page)


class Joining:
    """The scheduler's joining and stepping (a mixin of :class:`~.loop.Scheduler`, which owns the state)."""

    config: SchedulerConfig
    max_rows: int
    batch_tokens_limit: int | None
    _row_cap: int
    _ready: deque[Admitted]
    _running: dict[int, Admitted]
    _preparing: deque[Preparing]
    _prefilling: Admitted | None
    _step_ms: deque[float]
    _step_times: deque[float]
    _finished_at: deque[float]
    _on_page: Callable[[PageResult, OcrOptions], None]
    _on_step: Callable[[int], None]

    if TYPE_CHECKING:  # the scheduler's (declared, not defined: the MRO must find the scheduler's own)

        @property
        def _loaded(self) -> OCREngine: ...

        @property
        def _decoding(self) -> DecodeBatch: ...

        @property
        def join_budget_ms(self) -> float: ...

    def _prepare_together(self, taken: list[tuple[PageRequest, int, PageTask]]) -> None:
        """Prepare pages in one engine call (one vision call per view size, pruning in one pass); each becomes
        ready to join, or fails its own request."""
        try:
            prepared = self._loaded.prepare([task for _, _, task in taken])
        except Exception as exc:  # the engine returns per-page failures; anything else fails these pages only
            prepared = [exc] * len(taken)
        for (request, index, _), page in zip(taken, prepared, strict=True):
            if isinstance(page, BaseException):
                request.fail(page)
            else:
                line_up(self._ready, Admitted(request, index, page))
        for failure in {id(p): p for p in prepared if isinstance(p, BaseException)}.values():
            after_failed_call(failure)  # a lost device ends the loop; the pages above have their answer

    def _join(self) -> None:
        """Prefill ready pages into the batch while the KV budget allows; halve on failure."""
        limit = len(self._ready)
        while self._ready and limit:
            joiners = self._fitting(limit)
            if not joiners:
                return
            try:
                finished = self._decoding.join([r.sequence for r in joiners])
            except Exception as exc:
                after_failed_call(exc)
                if len(joiners) == 1:
                    self._ready.popleft()
                    joiners[0].request.fail(exc)
                    limit = len(self._ready)
                else:
                    limit = len(joiners) // 2
                    log.warning("prefill of %d pages failed (%s); retrying with %d", len(joiners), exc, limit)
                continue
            for _ in joiners:
                self._ready.popleft()
            for r in joiners:
                self._running[id(r.sequence)] = r
            self._settle(finished)
            limit = len(self._ready)

    def _fitting(self, limit: int) -> list[Admitted]:
        """The longest prefix of the ready pages (at most ``limit``) that fits the KV budget and the
        row cap; at least one page when the batch is empty, so a page larger than the budget still runs."""
        if not self._decoding.rows:
            self._row_cap = self.max_rows  # memory trouble ends with the batch it was in
        room = max(0, self._row_cap - len(self._decoding.rows))
        joiners: list[Admitted] = []
        for r in list(self._ready)[: min(limit, room)]:
            lengths = [j.prefill_tokens for j in joiners] + [r.prefill_tokens]
            budget = self.batch_tokens_limit
            fits = budget is None or self._decoding.footprint_with(lengths) <= budget  # None: the decoder budgets
            if not fits and (joiners or self._decoding.rows):
                break
            joiners.append(r)
        return joiners

    # --- join in pieces, while pages decode -------------------------------------------------------------

    def _in_pieces(self) -> bool:
        """Whether joining work runs in pieces now: interactive pages are decoding (continuous batching) and the
        budget is on. Only someone waiting on a page's tokens minds the pause: with only job pages decoding, or
        none, pages are prepared and prefilled together (faster for them, and for an interactive page joining
        a batch of job pages)."""
        on = self.config.join_budget_ms is None or self.config.join_budget_ms > 0
        return on and self.config.batching == "continuous" and self._readers_waiting()

    def _readers_waiting(self) -> bool:
        return any(r.request.priority == "interactive" for r in self._running.values())

    def _join_in_pieces(self) -> None:
        """Run pieces of joining work until this iteration's budget is spent (at least one piece): a chunk
        of the prefilling page's prompt, else the next page's next vision view or its pruning. Pages that
        were prepared join one at a time through chunked prefill (a batch whose decoder schedules its own
        prefills, vLLM's, takes them whole). With no interactive page decoding there is no budget."""
        budget_s = self.join_budget_ms / 1e3 if self._readers_waiting() else math.inf
        started = time.perf_counter()
        while self._next_piece():
            if time.perf_counter() - started >= budget_s:
                return

    def _next_piece(self) -> bool:
        """One piece of joining work; False when there was none to do. While interactive pages decode, job pages'
        joining work waits (their rows decode on): it would slow every step of the interactive pages, and job
        pages take the turns interactive ones leave. Interactive pages are first in both lines (:func:`line_up`)."""
        if self._prefilling is not None:
            self._prefill_chunk(self._prefilling)
            return True
        readers = self._readers_waiting()
        if self._ready and (not readers or not isinstance(self._decoding, PrefillsInChunks)):
            self._join()  # no reader waits on a decoding page (no pause to bound), or the decoder prefills itself
        elif self._interactive_first() and self._fitting(1):
            self._prefilling = self._ready.popleft()
            return True
        if not readers and self._unstarted_together():
            return False  # one engine call an iteration, as admission makes
        if not self._preparing:  # (only interactive pages are prepared in pieces: job pages wait with the pool)
            return False
        self._prepare_piece(self._preparing[0])
        return True

    def _unstarted_together(self) -> bool:
        """Once no reader waits, pages admitted in pieces whose work has not started are prepared together (within
        ``max_prefill_tokens`` visual tokens), as admission would: pieces are for the pause a reader minds."""
        taken: list[Preparing] = []
        visual_tokens = 0
        for page in list(self._preparing):
            if inspect.getgeneratorstate(page.pieces) != inspect.GEN_CREATED:
                continue
            if taken and visual_tokens + page.task.prepared_tokens > self.config.max_prefill_tokens:
                break
            taken.append(page)
            visual_tokens += page.task.prepared_tokens
        for page in taken:
            self._preparing.remove(page)
            page.pieces.close()
        if taken:
            self._prepare_together([(page.request, page.index, page.task) for page in taken])
        return bool(taken)

    def _interactive_first(self) -> bool:
        """Put the first interactive ready page at the front of the ready line (an evicted job page may be
        there); False when none is ready."""
        page = next((r for r in self._ready if r.request.priority == "interactive"), None)
        if page is None:
            return False
        self._ready.remove(page)
        self._ready.appendleft(page)
        return True

    def _prepare_piece(self, page: Preparing) -> None:
        """The next view or the pruning of a page prepared in pieces; when it is done it is ready to join."""
        try:
            next(page.pieces)
            return
        except StopIteration as done:
            line_up(self._ready, Admitted(page.request, page.index, done.value))
        except Exception as exc:  # this page only: it could not be encoded or pruned
            page.request.fail(exc)
            after_failed_call(exc)  # a lost device ends the loop; the page above has its answer
        finally:
            if inspect.getgeneratorstate(page.pieces) == inspect.GEN_CLOSED:  # finished or failed
                self._preparing.remove(page)

    def _prefill_chunk(self, r: Admitted) -> None:
        """The next chunk of a joining page's prefill; once its prompt is in, it joins the batch."""
        batch = self._decoding
        assert isinstance(batch, PrefillsInChunks)  # pages are prefilled in chunks only on such a batch
        try:
            if batch.prefill_chunk(r.sequence, self.config.prefill_chunk_tokens):
                self._prefilling = None
                finished = self._decoding.join([r.sequence])
                self._running[id(r.sequence)] = r
                self._settle(finished)
        except Exception as exc:  # this page only: the rows that decode are untouched
            self._prefilling = None
            self._decoding.remove([r.sequence])
            r.request.fail(exc)
            after_failed_call(exc)

    # --- step -----------------------------------------------------------------------------------------

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            finished = self._decoding.step()
        except Exception as exc:
            after_failed_call(exc)
            self._evict_after_failure(exc)
            return
        self._step_ms.append((time.perf_counter() - started) * 1e3)
        self._step_times.append(time.monotonic())
        self._on_step(len(self._decoding.rows) + len(finished))
        self._settle(finished)

    def _evict_after_failure(self, exc: Exception) -> None:
        """A failed step is retried with fewer pages: the newest half goes back to the ready list, keeping
        the tokens it generated (it rejoins by prefilling its prompt plus those tokens, so what was
        streamed stays what is returned); a page that fails alone fails."""
        rows = self._decoding.rows
        if len(rows) == 1:
            r = self._running.pop(id(rows[0]))
            self._decoding.remove(rows)
            r.request.fail(exc)
            return
        evicted = rows[len(rows) // 2 :]
        log.warning("decode step with %d pages failed (%s); evicting %d", len(rows), exc, len(evicted))
        self._row_cap = len(rows) - len(evicted)  # evicted pages rejoin as others finish
        self._decoding.remove(evicted)
        for seq in reversed(evicted):
            self._ready.appendleft(self._running.pop(id(seq)))

    def _settle(self, finished) -> None:
        for seq in finished:
            r = self._running.pop(id(seq), None)
            if r is None:
                continue
            result = self._loaded.page_result(r.page)
            self._finished_at.append(time.monotonic())
            if isinstance(result, BaseException):
                r.request.fail(result)
                continue
            self._on_page(result, r.request.options)
            r.request.record(r.index, result)
