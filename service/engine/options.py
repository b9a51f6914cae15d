"""Everything a caller may choose for a page, declared once, and the one call that turns a door's
choices into the options a page runs with.

:class:`PageKnobs` are the knobs every door speaks (the chat and Mistral doors take them as their
``rtprune`` object); :class:`OcrOptions` extends them with the task, the budget and the guard (the
form, jobs and the CLI, whose flags are generated from its fields). :func:`resolve_options` is the
ritual every door and the CLI go through, in one order: the caller's choices, then the model's and
the decoder's defaults, then the checks that need the model. Importable without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WrapValidator

from .decode.sequence import NGramGuard
from .names import MODES_BY_VERSION, PRUNER_NAMES, Mode, Positions, Task
from .prompts import build_prompt

POSITIONS_HELP = (
    "original: kept tokens keep their unpruned positions (the authors' scheme, default); "
    "compact: 0..L-1 (the only scheme, and the default, on the vLLM decoder)"
)
PrunerName = Literal["rtprune", "none", "random", "norm", "divprune"]
assert PrunerName.__args__ == PRUNER_NAMES, "keep PrunerName in step with names.PRUNER_NAMES"


def in_one_sentence(sentence: Callable[[Any], str]) -> WrapValidator:
    """A field's validation errors (one per member of a union, or a regex) replaced by ``sentence(value)``:
    what every door answers, while the field's type and JSON schema stay as declared."""

    def validate(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValueError:
            raise ValueError(sentence(value)) from None

    return WrapValidator(validate)


Retention = Annotated[
    Annotated[float, Field(gt=0.0, le=1.0)] | Literal["auto"],
    in_one_sentence(lambda value: f"retention must be a number in (0, 1] or 'auto'; got {str(value)[:40]}"),
]


MAX_NEW_TOKENS = 8192  # DeepSeek-OCR's own budget, and the most a page may ask for


class PageKnobs(BaseModel):
    """How a page is seen and pruned: the knobs of this service that no OCR API has a field for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode = Field(Mode.gundam, description="resolution mode; gundam adds tiles on large pages")
    pruner: PrunerName = Field("rtprune", description="visual-token pruner; none keeps every token")
    retention: Retention = Field(
        "auto",
        description="share of grid tokens kept, in (0, 1], or auto (RTPrune's per-image ratio)",
        examples=["auto", 0.8425],
    )
    positions: Positions = Field(Positions.original, description=POSITIONS_HELP)
    max_crops: int = Field(6, ge=2, le=9, description="most Gundam tiles")
    adapt: bool = Field(
        True,
        description="under load the server may lower retention (if RTPRUNE_ADAPTIVE_TARGET_WAIT_S is set); "
        "false pins this page's retention",
    )

    @property
    def fixed_retention(self) -> float | None:
        """The retention as a number, or None for ``auto`` (RTPrune's own per-image ratio): the one place the
        sentinel is read."""
        return None if self.retention == "auto" else float(self.retention)


class OcrOptions(PageKnobs):
    """Everything a caller may choose per page. Defaults follow DeepSeek-OCR's own."""

    task: Task = Field(Task.markdown, description="which official prompt to use")
    ref: str | None = Field(None, max_length=1000, description="what to find, for task 'locate'")
    prompt: str | None = Field(
        None,
        max_length=4000,
        description="raw prompt with exactly one <image> placeholder; overrides task",
        json_schema_extra={"pattern": r"^(?![\s\S]*<image>[\s\S]*<image>)[\s\S]*<image>[\s\S]*$"},
        examples=["<image>\nFree OCR."],
    )
    max_new_tokens: int = Field(
        MAX_NEW_TOKENS,
        ge=1,
        le=MAX_NEW_TOKENS,
        description="most tokens generated for a page (on the random presets: 32 by default, at most 256 at the doors)",
    )
    ngram_size: int = Field(30, ge=0, le=512, description="no-repeat n-gram size; 0 disables the guard")
    ngram_window: int = Field(90, ge=0, le=8192, description="generated tokens the guard looks back over")
    token_map: bool = Field(False, description="also return the global view's token map and a page preview")

    def guard(self) -> NGramGuard:
        return NGramGuard(size=self.ngram_size, window=self.ngram_window)

    def prompt_text(self) -> str:
        return build_prompt(self.task, ref=self.ref, prompt=self.prompt)

    def validate_for_run(self, version: str = "v1") -> str:
        """Checks that need more than one field or the model; raise ValueError before any heavy work.
        Returns the prompt text (built here anyway, so a page builds it once)."""
        text = self.prompt_text()
        self.guard()
        modes = MODES_BY_VERSION[version]
        if self.mode not in modes:
            raise ValueError(
                f"mode {self.mode.value!r} is not available for DeepSeek-OCR {version}; choose one of "
                f"{', '.join(m.value for m in modes)}"
            )
        return text


RANDOM_MAX_NEW_TOKENS = 32  # random weights never write end-of-text: without a cap every page runs to 8192
RANDOM_TOKEN_CAP = 256  # the most a page may ask for on a random preset at the doors (seconds, not minutes, on CPU)


def resolve_options(
    chosen: dict[str, Any],
    *,
    version: str = "v1",
    random_weights: bool = False,
    decoder: str = "transformers",
    check_decoder: Callable[[OcrOptions], None] | None = None,
    random_cap: int | None = None,
) -> tuple[OcrOptions, list[str]]:
    """The options a page runs with, from the fields a caller set explicitly (every door and the CLI pass
    only those), and a note for every chosen option that has no effect.

    One order for everyone: build and validate the caller's fields; apply the defaults that depend on
    the model and the decoder; check what needs the model (modes of this version, the prompt, the guard)
    and the decoder (``check_decoder``). On random weights, ``random_cap`` caps what a caller may ask
    (the doors pass it: a try-out asking for 8192 tokens would otherwise wait many minutes for text
    that means nothing). Raises ValueError (pydantic's ValidationError is one)."""
    options = OcrOptions(**chosen)
    notes = []
    if decoder == "vllm" and "positions" not in chosen:  # vLLM numbers positions contiguously
        options = options.model_copy(update={"positions": Positions.compact})
    if random_weights and "max_new_tokens" not in chosen:
        options = options.model_copy(update={"max_new_tokens": RANDOM_MAX_NEW_TOKENS})
        notes.append(
            f"random weights never write end-of-text, so max_new_tokens defaults to {RANDOM_MAX_NEW_TOKENS} "
            "on this preset (set it to change that)"
        )
    elif random_weights and random_cap is not None and options.max_new_tokens > random_cap:
        notes.append(
            f"max_new_tokens {options.max_new_tokens} is capped at {random_cap} on random weights, which never "
            "write end-of-text (RTPRUNE_RANDOM_MAX_NEW_TOKENS raises the cap)"
        )
        options = options.model_copy(update={"max_new_tokens": random_cap})
    if options.pruner == "none" and "retention" in chosen:
        notes.append("retention is ignored with pruner=none: every visual token is kept")
    if "max_crops" in chosen and options.mode is not Mode.gundam:
        notes.append(f"max_crops is ignored in mode {options.mode.value!r}: only gundam cuts the page into tiles")
    if options.pruner == "none" and "positions" in chosen:
        notes.append("positions has no effect with pruner=none: nothing is removed, so both schemes agree")
    options.validate_for_run(version)
    if check_decoder is not None:
        check_decoder(options)
    return options, notes
