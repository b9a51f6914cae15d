"""Prefill the pruned prompts, then decode greedily with the KV cache, one or many at a time.

Written out (rather than ``model.generate``) because the walk needs what ``generate`` does
not give: positions with gaps that continue from the unpruned length, per-sequence stop
rules, repetition guards and cancellation, and separate prefill/decode timings.

A batch is left-padded into one prefill; then each decode step feeds one token per live
sequence. A sequence that ends (eos, its own token budget, or cancellation) leaves the
batch: its rows are dropped from the KV cache, so the others go on without it. A batch of
one runs without an attention mask, exactly the single-request path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache

from .assemble import PromptInputs
from .model import OcrModel
from .stats import StageTimer, shared_stage

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


@dataclass
class Sequence:
    """One prompt's generation state inside a batch."""

    prompt: PromptInputs
    budget: int
    guard: NGramGuard
    timer: StageTimer
    should_stop: Callable[[], bool]
    tokens: list[int] = field(default_factory=list)
    outcome: Generation | BaseException | None = None


def next_token(logits: torch.Tensor, banned: set[int]) -> int:
    """Greedy choice over (vocab,) float32 logits with banned ids removed."""
    if banned:
        logits = logits.clone()
        logits[list(banned)] = float("-inf")
    return int(logits.argmax())


def _left_pad(prompts: list[PromptInputs]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack prompts right-aligned: embeds (B, L, hidden), position ids (B, L), attention mask (B, L)."""
    length = max(p.length for p in prompts)
    first = prompts[0].embeds
    embeds = first.new_zeros(len(prompts), length, first.shape[-1])
    positions = torch.zeros(len(prompts), length, dtype=torch.long, device=first.device)
    mask = torch.zeros(len(prompts), length, dtype=torch.long, device=first.device)
    for row, prompt in enumerate(prompts):
        embeds[row, length - prompt.length :] = prompt.embeds
        positions[row, length - prompt.length :] = prompt.position_ids
        mask[row, length - prompt.length :] = 1
    return embeds, positions, mask


@torch.inference_mode()
def generate_batch(model: OcrModel, sequences: list[Sequence]) -> None:
    """Generate for every sequence; each one's ``outcome`` is set to a Generation or an exception."""
    live = []
    for seq in sequences:
        seq.budget = min(seq.budget, model.max_positions - seq.prompt.next_position)
        if seq.budget < 1:
            seq.outcome = ValueError(
                f"the prompt already uses {seq.prompt.next_position} of the model's "
                f"{model.max_positions} positions; nothing can be generated"
            )
        else:
            live.append(seq)
    if not live:
        return
    cache = DynamicCache(config=model.text_config)
    embeds, positions, mask = _left_pad([seq.prompt for seq in live])
    attention = mask if len(live) > 1 else None  # a batch of one needs no mask: the plain causal path
    with shared_stage([seq.timer for seq in live], "prefill", model.device):
        out = model.decoder(
            inputs_embeds=embeds,
            position_ids=positions,
            attention_mask=attention,
            past_key_values=cache,
            use_cache=True,
        )
        logits = model.logits(out.last_hidden_state[:, -1])  # (B, vocab)
    decode_start = time.perf_counter()
    while live:
        staying, feed = [], []
        for row, seq in enumerate(live):
            token = next_token(logits[row], seq.guard.banned(seq.tokens))
            if token == EOS_ID:
                seq.outcome = Generation(seq.tokens, "eos")
            else:
                seq.tokens.append(token)
                if len(seq.tokens) >= seq.budget:
                    seq.outcome = Generation(seq.tokens, "length")
                elif seq.should_stop():
                    seq.outcome = Cancelled("generation cancelled")
            if seq.outcome is None:
                staying.append(row)
                feed.append(token)
            else:
                seq.timer.add("decode", (time.perf_counter() - decode_start) * 1e3)
        if not staying:
            return
        if len(staying) < len(live):  # finished sequences leave the batch and the cache
            keep = torch.tensor(staying, device=model.device)
            cache.batch_select_indices(keep)
            mask = mask[keep]
            live = [live[row] for row in staying]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        step_positions = torch.tensor(
            [[seq.prompt.next_position + len(seq.tokens) - 1] for seq in live], device=model.device
        )
        out = model.decoder(
            inputs_embeds=model.embed(torch.tensor(feed)[:, None]),
            position_ids=step_positions,
            attention_mask=mask if attention is not None else None,
            past_key_values=cache,
            use_cache=True,
        )
        logits = model.logits(out.last_hidden_state[:, -1])


def generate(
    model: OcrModel,
    prompt: PromptInputs,
    *,
    max_new_tokens: int,
    guard: NGramGuard,
    timer: StageTimer,
    should_stop: Callable[[], bool] | None = None,
) -> Generation:
    """Greedy decoding of one prompt until eos, ``max_new_tokens`` or the model's positions run out."""
    seq = Sequence(prompt, max_new_tokens, guard, timer, should_stop or (lambda: False))
    generate_batch(model, [seq])
    if isinstance(seq.outcome, BaseException):
        raise seq.outcome
    return seq.outcome
