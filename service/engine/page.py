"""What crosses between the engine and the scheduler for one page: the task going in, the page prepared
to join a batch, the result coming out, and the one client error a prompt can raise."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image
from pydantic import BaseModel, Field, PrivateAttr

from pruning import PruneResult, combined_ratio

from .decode.sequence import Sequence, never
from .model import VisualBlock
from .options import OcrOptions
from .postprocess import Box
from .preprocess import PreparedImage
from .prompts import PromptIds
from .stats import Adaptation, PageStats, StageTimer
from .token_map import TokenMap


@dataclass
class PageTask:
    """One page of one request, as the batch runner takes it."""

    image: Image.Image | None  # None once the page is prepared (unless its token map needs it)
    options: OcrOptions
    timer: StageTimer
    should_stop: Callable[[], bool] = never
    on_token: Callable[[int, int], None] | None = None  # (position, token id) as each token is chosen
    # What :meth:`OCREngine.prepare_on_host` computes once, off the thread that drives the model:
    prompt: PromptIds | None = None  # the prompt's text tokens
    pixels: PreparedImage | None = None  # the views (uint8 from the service's threads), not yet on the device
    visual_tokens: int | None = None  # the page's visual block before pruning
    adaptation: Adaptation | None = None  # a retention cap the scheduler set under load (None: as asked)

    @property
    def on_host_done(self) -> bool:
        return self.pixels is not None

    @property
    def prepared_tokens(self) -> int:
        """The page's visual tokens before pruning, known once its host work is done."""
        if self.visual_tokens is None:
            raise RuntimeError("the page's visual tokens are counted by its host work (prepare_on_host)")
        return self.visual_tokens


class PromptTooLong(ValueError):
    """The page's prompt leaves no position of the model to generate into (a client error)."""


@dataclass
class PreparedPage:
    """A page ready to join a batch: its visual block, what pruning kept, and the sequence to decode."""

    task: PageTask
    block: VisualBlock
    pruned: PruneResult
    sequence: Sequence

    @property
    def prompt_tokens(self) -> int:
        return self.sequence.prompt.length


class PageResult(BaseModel):
    """One page: the model's raw text, clean markdown, layout boxes and statistics."""

    markdown: str
    text: str = Field(description="raw model output with grounding tags")
    boxes: list[Box]
    stats: PageStats
    token_map: TokenMap | None = Field(None, description="only with token_map=true")
    preview: str | None = Field(None, description="page preview as a JPEG data URL; only with token_map=true")
    _spans: dict[str, list[tuple[float, float]]] = PrivateAttr(default_factory=dict)  # stage -> wall-clock spans
    _page_size: tuple[int, int] = PrivateAttr(default=(0, 0))
    _tokens: list[int] = PrivateAttr(default_factory=list)

    @property
    def page_size(self) -> tuple[int, int]:
        """(width, height) of the page as it was OCR'd, in pixels."""
        return self._page_size

    @property
    def tokens(self) -> list[int]:
        """The generated token ids (a door that decodes them itself, e.g. chat with skip_special_tokens)."""
        return self._tokens


def settled_adaptation(adaptation: Adaptation | None, options: OcrOptions, pruned: PruneResult) -> Adaptation | None:
    """The page's adaptation with ``adapted`` known: whether the cap lowered the ratio the page would have had
    (its fixed retention, or RTPrune's own per-image ratio)."""
    if adaptation is None:
        return None
    asked = options.fixed_retention
    if asked is None:
        asked = combined_ratio(pruned.r_sim, pruned.r_txt) if pruned.r_sim is not None else 1.0
    return adaptation.model_copy(update={"adapted": adaptation.cap < asked})
