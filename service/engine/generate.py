"""Prefill the pruned prompt, then decode greedily with the KV cache.

Written out (rather than ``model.generate``) because the walk needs three things
``generate`` does not give: positions with gaps that continue from the unpruned length,
a cancellation check between steps, and separate prefill/decode timings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache

from .assemble import PromptInputs
from .model import OcrModel
from .stats import StageTimer

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


def next_token(logits: torch.Tensor, banned: set[int]) -> int:
    """Greedy choice over (vocab,) float32 logits with banned ids removed."""
    if banned:
        logits = logits.clone()
        logits[list(banned)] = float("-inf")
    return int(logits.argmax())


@torch.inference_mode()
def generate(
    model: OcrModel,
    prompt: PromptInputs,
    *,
    max_new_tokens: int,
    guard: NGramGuard,
    timer: StageTimer,
    should_stop: Callable[[], bool] | None = None,
) -> Generation:
    """Greedy decoding from ``prompt`` until eos, ``max_new_tokens`` or the model's positions run out."""
    budget = min(max_new_tokens, model.max_positions - prompt.next_position)
    if budget < 1:
        raise ValueError(
            f"the prompt already uses {prompt.next_position} of the model's {model.max_positions} "
            "positions; nothing can be generated"
        )
    stop = should_stop or (lambda: False)
    cache = DynamicCache(config=model.text_config)
    with timer.stage("prefill"):
        out = model.decoder(
            inputs_embeds=prompt.embeds[None],
            position_ids=prompt.position_ids[None],
            past_key_values=cache,
            use_cache=True,
        )
        logits = model.logits(out.last_hidden_state[0, -1])  # (vocab,)
    tokens: list[int] = []
    with timer.stage("decode"):
        for step in range(budget):
            token = next_token(logits, guard.banned(tokens))
            if token == EOS_ID:
                return Generation(tokens, "eos")
            tokens.append(token)
            if step == budget - 1:
                break
            if stop():
                raise Cancelled("generation cancelled")
            position = torch.tensor([[prompt.next_position + step]], device=model.device)
            out = model.decoder(
                inputs_embeds=model.embed(torch.tensor([[token]])),
                position_ids=position,
                past_key_values=cache,
                use_cache=True,
            )
            logits = model.logits(out.last_hidden_state[0, -1])
    return Generation(tokens, "length")
