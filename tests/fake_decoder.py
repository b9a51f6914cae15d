"""A decoder with no model, for testing the scheduler as a state machine (vLLM tests its scheduler on
fake model outputs the same way): a :class:`FakeBatch` keeps the ``DecodeBatch`` contract, and a
:class:`FakeEngine` prepares pages for it instantly.

A page's ``max_new_tokens`` is how many tokens it generates (every step gives each row one token),
so a test picks a page's length, and tells pages apart, by that number.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from service.engine.decode.sequence import Generation, NGramGuard, Sequence

PROMPT_TOKENS = 100  # every fake page's prompt


@dataclass
class Trace:
    """What the scheduler asked of the decoder, in order."""

    joins: list[int] = field(default_factory=list)  # joiners per join call, failed calls included
    steps: list[int] = field(default_factory=list)  # rows per step call, failed calls included
    prepared: list[int] = field(default_factory=list)  # max_new_tokens of each page, in order of admission
    tokens: list[tuple[int, int]] = field(default_factory=list)  # (page, position) of every token announced


class FakeBatch:
    """Rows that each gain one token per step. Faults on demand: a join of more than ``join_limit``
    pages raises, and a step raises out of memory while a row with budget ``poison`` is in it or the
    batch has more than ``step_limit`` rows."""

    def __init__(
        self, engine: FakeEngine, *, join_limit: int | None, step_limit: int | None, poison: int | None, step_s: float
    ) -> None:
        self.rows: list[Sequence] = []
        self.engine, self.trace = engine, engine.trace
        self.join_limit, self.step_limit, self.poison, self.step_s = join_limit, step_limit, poison, step_s

    @property
    def tokens_in_use(self) -> int:
        return len(self.rows) * self._width()

    def footprint_with(self, prompt_lengths: list[int]) -> int:
        return (len(self.rows) + len(prompt_lengths)) * max([self._width(), *prompt_lengths])

    def _width(self) -> int:
        return max((seq.prompt.length + len(seq.tokens) for seq in self.rows), default=0)

    def join(self, joiners: list[Sequence]) -> list[Sequence]:
        self.trace.joins.append(len(joiners))
        if self.join_limit is not None and len(joiners) > self.join_limit:
            raise RuntimeError(f"prefill of {len(joiners)} pages failed (injected)")
        self.rows += joiners
        return self._advance(list(joiners))

    def step(self) -> list[Sequence]:
        self.trace.steps.append(len(self.rows))
        if self.engine.fail_step is not None:
            exc, self.engine.fail_step = self.engine.fail_step, None
            raise exc
        too_many = self.step_limit is not None and len(self.rows) > self.step_limit
        if too_many or any(seq.budget == self.poison for seq in self.rows):
            raise self.engine.out_of_memory("out of memory in a decode step (injected)")
        time.sleep(self.step_s)
        return self._advance(list(self.rows))

    def remove(self, leaving: list[Sequence]) -> None:
        gone = {id(seq) for seq in leaving}
        self.rows = [seq for seq in self.rows if id(seq) not in gone]

    def _advance(self, rows: list[Sequence]) -> list[Sequence]:
        finished = []
        for seq in rows:
            seq.add(len(seq.tokens) + 1)  # token ids 1, 2, 3, ...: a recomputed page repeats them
            if len(seq.tokens) >= seq.budget:
                seq.outcome = Generation(list(seq.tokens), "length")
                finished.append(seq)
        self.remove(finished)
        return finished


@dataclass
class FakePage:
    """What the scheduler keeps of a prepared page: its sequence and its prompt's length."""

    sequence: Sequence
    prompt_tokens: int = PROMPT_TOKENS


class FakeEngine:
    """Prepares pages instantly for a :class:`FakeBatch`; a page's result is its token list."""

    version = "v1"
    device = torch.device("cpu")
    random_weights = False

    def __init__(
        self,
        *,
        join_limit: int | None = None,
        step_limit: int | None = None,
        poison: int | None = None,
        step_s: float = 0.0,
    ) -> None:
        self.trace = Trace()
        self.faults = {"join_limit": join_limit, "step_limit": step_limit, "poison": poison, "step_s": step_s}
        self.out_of_memory: type[Exception] = torch.OutOfMemoryError  # what running out raises
        self.fail_prepare: BaseException | None = None
        self.fail_step: BaseException | None = None  # raised by the next step
        self.admitted = threading.Event()

    def warmup(self) -> None:
        pass

    def prepare_on_host(self, task, *, pixels_only: bool = False):
        """Nothing to render or preprocess: the page's facts only (73 visual tokens, a Tiny page)."""
        return dataclasses.replace(task, pixels=task.image, visual_tokens=73)

    def new_batch(self) -> FakeBatch:
        return FakeBatch(self, **self.faults)

    def prepare(self, tasks) -> list:
        self.admitted.set()
        if self.fail_prepare is not None:
            raise self.fail_prepare
        pages = []
        for task in tasks:
            self.trace.prepared.append(task.options.max_new_tokens)
            prompt = SimpleNamespace(length=PROMPT_TOKENS, next_position=PROMPT_TOKENS)
            guard = NGramGuard(size=0, window=0)
            page = len(self.trace.prepared)
            announce = lambda position, token, page=page: self.trace.tokens.append((page, position))  # noqa: E731
            sequence = Sequence(prompt, task.options.max_new_tokens, guard, task.timer, task.should_stop, announce)
            pages.append(FakePage(sequence))
        return pages

    def prepare_in_pieces(self, task):
        """:meth:`prepare` for one page, in two pieces (its "vision", its "pruning"), as the engine's."""
        yield
        yield
        page = self.prepare([task])[0]
        if isinstance(page, BaseException):
            raise page
        return page

    def page_result(self, page: FakePage):
        outcome = page.sequence.outcome
        return outcome if isinstance(outcome, BaseException) else list(outcome.tokens)
