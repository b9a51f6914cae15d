"""One page's generation state, and the rules it decodes under (stop, n-gram guard).

Shared by the running batch (:mod:`.batch`), which advances many sequences one token at
a time, and the drivers that run a batch to its end (:mod:`.generate`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # annotations only: the options model imports NGramGuard without torch
    from ..assemble import PromptInputs
    from ..stats import StageTimer

TABLE_CELL_IDS = frozenset({128821, 128822})  # <td>, </td>: tables legitimately repeat them
EOS_ID = 1


class Cancelled(Exception):
    """Generation stopped because its request was cancelled or ran past its deadline."""


@dataclass(frozen=True)
class NGramGuard:
    """Windowed no-repeat n-gram rule of DeepSeek-OCR's official scripts.

    Forbid the token that would complete an n-gram already seen among the last
    ``window`` generated tokens; table-cell tokens are exempt. ``size`` 0 disables it.
    """

    size: int = 30
    window: int = 90
    whitelist: frozenset[int] = field(default=TABLE_CELL_IDS)

    def __post_init__(self) -> None:
        if self.size < 0 or self.window < 0:
            raise ValueError(f"ngram size and window must be >= 0, got {self.size} and {self.window}")
        if self.size and self.window < self.size:
            raise ValueError(f"ngram window ({self.window}) must be at least the ngram size ({self.size})")

    def banned(self, generated: list[int]) -> set[int]:
        n = self.size
        if n == 0 or len(generated) < n:
            return set()
        if n == 1:
            return set(generated[-self.window :]) - self.whitelist
        prefix = generated[-(n - 1) :]
        start = max(0, len(generated) - self.window)
        banned = {
            generated[i + n - 1] for i in range(start, len(generated) - n + 1) if generated[i : i + n - 1] == prefix
        }
        return banned - self.whitelist


@dataclass(frozen=True)
class Generation:
    tokens: list[int]
    finish_reason: Literal["eos", "length"]


def never() -> bool:
    """The stop rule of a page nobody cancels."""
    return False


@dataclass(eq=False)  # a sequence is itself, not its contents (tensors do not compare to a bool)
class Sequence:
    """One prompt's generation state inside a batch. ``budget`` is new tokens at most;
    ``should_stop`` is polled between steps by the drivers (cancellation, deadlines)."""

    prompt: PromptInputs
    budget: int
    guard: NGramGuard
    timer: StageTimer
    should_stop: Callable[[], bool] = never
    on_token: Callable[[int, int], None] | None = None  # (position in the output, token id), e.g. streaming
    tokens: list[int] = field(default_factory=list)
    outcome: Generation | BaseException | None = None

    def add(self, token: int) -> None:
        """Record one generated token and tell ``on_token`` (whichever decoder chose it)."""
        self.tokens.append(token)
        if self.on_token is not None:
            self.on_token(len(self.tokens) - 1, token)
