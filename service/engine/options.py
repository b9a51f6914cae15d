"""Everything a caller may choose for a page (one options model, validated once, for every front
door: the form, chat, jobs, the CLI), and the defaults that depend on the model."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from pruning import PRUNERS

from .assemble import Positions
from .decode.sequence import NGramGuard
from .decode.vllm_decoder import check_options
from .preprocess import V1_MODES, V2_MODES, Mode
from .prompts import Task, build_prompt

POSITIONS_HELP = (
    "original: kept tokens keep their unpruned positions (the authors' scheme, default); "
    "compact: 0..L-1 (the only scheme, and the default, on the vLLM decoder)"
)
PrunerName = Literal["rtprune", "none", "random", "norm", "divprune"]
assert set(PrunerName.__args__) == set(PRUNERS), "keep PrunerName in step with pruning.PRUNERS"


class OcrOptions(BaseModel):
    """Everything a caller may choose per page. Defaults follow DeepSeek-OCR's own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode = Mode.gundam
    task: Task = Task.markdown
    ref: str | None = Field(None, max_length=1000, description="what to find, for task 'locate'")
    prompt: str | None = Field(
        None,
        max_length=4000,
        description="raw prompt with exactly one <image> placeholder; overrides task",
        json_schema_extra={"pattern": r"^(?![\s\S]*<image>[\s\S]*<image>)[\s\S]*<image>[\s\S]*$"},
        examples=["<image>\nFree OCR."],
    )
    pruner: PrunerName = "rtprune"
    retention: Annotated[float, Field(gt=0.0, le=1.0)] | Literal["auto"] = Field(
        "auto",
        description="share of grid tokens kept, in (0, 1], or auto (RTPrune's per-image ratio)",
        examples=["auto", 0.8425],
    )
    positions: Positions = Field(
        Positions.original,
        description=POSITIONS_HELP,
    )
    max_new_tokens: int = Field(8192, ge=1, le=8192)
    ngram_size: int = Field(30, ge=0, le=512, description="no-repeat n-gram size; 0 disables the guard")
    ngram_window: int = Field(90, ge=0, le=8192, description="generated tokens the guard looks back over")
    max_crops: int = Field(6, ge=2, le=9, description="most Gundam tiles")
    token_map: bool = Field(False, description="also return the global view's token map and a page preview")

    def guard(self) -> NGramGuard:
        return NGramGuard(size=self.ngram_size, window=self.ngram_window)

    def prompt_text(self) -> str:
        return build_prompt(self.task, ref=self.ref, prompt=self.prompt)

    def validate_for_run(self, version: str = "v1") -> None:
        """Checks that need more than one field or the model; raise ValueError before any heavy work."""
        self.prompt_text()
        self.guard()
        modes = V1_MODES if version == "v1" else V2_MODES
        if self.mode not in modes:
            raise ValueError(
                f"mode {self.mode.value!r} is not available for DeepSeek-OCR {version}; choose one of "
                f"{', '.join(m.value for m in modes)}"
            )


RANDOM_MAX_NEW_TOKENS = 32  # random weights never write end-of-text: without a cap every page runs to 8192


def resolve_options(
    options: OcrOptions, chosen: set[str], *, random_weights: bool, decoder: str = "transformers"
) -> tuple[OcrOptions, list[str]]:
    """Defaults that depend on the model and the decoder, and a note for every chosen option that has no
    effect; ValueError for what the decoder cannot do.

    ``chosen`` are the fields the caller set explicitly (pydantic's ``model_fields_set``)."""
    notes = []
    if decoder == "vllm":
        if "positions" not in chosen:  # vLLM numbers positions contiguously: compact is all it can decode
            options = options.model_copy(update={"positions": Positions.compact})
        check_options(options.positions, options.guard())
    if random_weights and "max_new_tokens" not in chosen:
        options = options.model_copy(update={"max_new_tokens": RANDOM_MAX_NEW_TOKENS})
        notes.append(
            f"random weights never write end-of-text, so max_new_tokens defaults to {RANDOM_MAX_NEW_TOKENS} "
            "on this preset (set it to change that)"
        )
    if options.pruner == "none" and "retention" in chosen:
        notes.append("retention is ignored with pruner=none: every visual token is kept")
    if "max_crops" in chosen and options.mode is not Mode.gundam:
        notes.append(f"max_crops is ignored in mode {options.mode.value!r}: only gundam cuts the page into tiles")
    if options.pruner == "none" and "positions" in chosen:
        notes.append("positions has no effect with pruner=none: nothing is removed, so both schemes agree")
    return options, notes
