"""A decoding batch whose rows join and leave between steps: iteration-level batching.

transformers' own continuous-batching manager takes token ids with contiguous positions
and shows its logits processors only the last token, so it cannot carry our pruned
embeddings, gapped position ids or the windowed n-gram guard. This module keeps one
``DynamicCache`` of shape (rows, heads, T, head_dim) per layer, left-padded:

- **join**: new sequences are prefilled together in a cache of their own (left-padded
  among themselves; a sequence that was evicted prefills its prompt plus the tokens it had
  already generated), their next token is chosen, and the two caches are concatenated
  along the batch after left-padding the shorter one. Padding columns are masked out,
  and every row carries its own position ids, so a row computes what it would alone.
- **step**: one token for every row in one forward; the greedy choice, the n-gram bans
  and a NaN check run on the whole batch, with a single device-to-host copy per step.
- **leave**: finished or cancelled rows are dropped from the cache (``batch_select``),
  and columns that have become padding for every row are trimmed.

A step that raises (e.g. out of memory half-way through the layers) leaves the cache as
it was before the step, so the caller may evict rows and try again.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from ..assemble import PromptInputs, extend_prompt
from ..model import OcrModel
from ..stats import shared_stage
from .sequence import EOS_ID, Generation, Sequence


class NonFiniteLogits(RuntimeError):
    """The model produced NaN logits for one page (e.g. corrupt features); that page fails alone."""


class RunningBatch:
    """Rows of :class:`Sequence` decoding together over one KV cache."""

    def __init__(self, model: OcrModel) -> None:
        self.model = model
        self.rows: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._last: torch.Tensor | None = None  # (rows,) last chosen token per row, on the device

    # --- bookkeeping, all on the host -------------------------------------------------------

    @property
    def width(self) -> int:
        """Cached columns T (the longest row, left padding included)."""
        return max((self._cached(seq) for seq in self.rows), default=0)

    @property
    def tokens_in_use(self) -> int:
        """KV slots the cache holds: rows x columns, padding included (what memory really pays)."""
        return len(self.rows) * self.width

    def footprint_with(self, prompt_lengths: list[int]) -> int:
        """KV slots after ``prompt_lengths`` joined, padding included."""
        width = max([self.width, *prompt_lengths])
        return (len(self.rows) + len(prompt_lengths)) * width

    @staticmethod
    def _cached(seq: Sequence) -> int:
        """Tokens of ``seq`` in the cache: the prompt and every generated token but the last."""
        return seq.prompt.length + max(0, len(seq.tokens) - 1)

    # --- join ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def join(self, joiners: list[Sequence]) -> list[Sequence]:
        """Prefill ``joiners`` together, choose their first tokens and add them to the batch.

        Returns the sequences that already finished (eos or a budget of one); they do not stay.
        On an exception nothing was added and the running rows are untouched.
        """
        for seq in joiners:
            seq.budget = min(seq.budget, self.model.max_positions - seq.prompt.next_position)
            assert seq.budget >= 1, "the engine checks that a prompt leaves room to generate"
        cache = DynamicCache(config=self.model.text_config)
        embeds, positions, mask = _left_pad([self.prefill_inputs(seq) for seq in joiners])
        with shared_stage([seq.timer for seq in joiners], "prefill", self.model.device):
            out = self.model.decoder(
                inputs_embeds=embeds,
                position_ids=positions,
                attention_mask=mask if len(joiners) > 1 else None,  # one row alone: the plain causal path
                past_key_values=cache,
                use_cache=True,
            )
            logits = self.model.logits(out.last_hidden_state[:, -1])  # (joiners, vocab)
            chosen, tokens, finite = _choose(logits, joiners)
        self._merge(cache, joiners, prompt_width=embeds.shape[1])
        self._last = chosen if self._last is None else torch.cat([self._last, chosen])
        return self._advance(joiners, tokens, finite, span=None)

    def prefill_inputs(self, seq: Sequence) -> PromptInputs:
        """What a joiner prefills: its prompt, plus the tokens it already generated when it rejoins after an
        eviction (so the text streamed before is the text it goes on from, even where bf16 GEMMs would
        not reproduce it)."""
        if not seq.tokens:
            return seq.prompt
        return extend_prompt(seq.prompt, self.model.embed(torch.tensor(seq.tokens, device=self.model.device)))

    def _merge(self, cache: DynamicCache, joiners: list[Sequence], prompt_width: int) -> None:
        if self._cache is None or not self.rows:
            self._cache, self.rows = cache, list(joiners)
            return
        width = max(self.width, prompt_width)
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.rows += joiners

    # --- step ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Feed every row its last token, choose the next; return the rows that finished (and left)."""
        if not self.rows:
            return []
        started = time.perf_counter()
        width = self.width
        positions = torch.tensor(
            [[seq.prompt.next_position + len(seq.tokens) - 1] for seq in self.rows], device=self.model.device
        )  # (rows, 1)
        try:
            out = self.model.decoder(
                inputs_embeds=self.model.embed(self._last[:, None]),  # (rows, 1, hidden)
                position_ids=positions,
                attention_mask=self._mask(width + 1),
                past_key_values=self._cache,
                use_cache=True,
            )
            logits = self.model.logits(out.last_hidden_state[:, -1])  # (rows, vocab)
            chosen, tokens, finite = _choose(logits, self.rows)
        except BaseException:
            self._crop(width)  # layers that already appended this step's column give it back
            raise
        self._last = chosen
        return self._advance(list(self.rows), tokens, finite, span=(started, time.perf_counter()))

    def _mask(self, width: int) -> torch.Tensor | None:
        """(rows, 1, 1, width) bool, True for real columns and False for left padding; None when no
        row is padded. Built from lengths the host knows, and 4-D so that transformers uses it as it
        is: its 2-D path asks the device whether the mask is all ones, a synchronisation per step."""
        lengths = [self._cached(seq) + 1 for seq in self.rows]
        if all(n == width for n in lengths):
            return None
        pad = torch.tensor([width - n for n in lengths], device=self.model.device)  # (rows,)
        return (torch.arange(width, device=self.model.device)[None, :] >= pad[:, None])[:, None, None, :]

    def _crop(self, width: int) -> None:
        if self._cache is None:
            return
        for layer in self._cache.layers:
            if layer.keys is not None and layer.keys.shape[-2] > width:
                layer.keys = layer.keys[..., :width, :]
                layer.values = layer.values[..., :width, :]

    def _advance(
        self, rows: list[Sequence], tokens: list[int], finite: list[bool], span: tuple[float, float] | None
    ) -> list[Sequence]:
        """Record each row's new token (and the step's span as decode time), retire the rows that finished."""
        finished = []
        for seq, token, ok in zip(rows, tokens, finite, strict=True):
            if span is not None:
                seq.timer.add_interval("decode", *span)
            if not ok:
                seq.outcome = NonFiniteLogits("the model produced NaN logits for this page")
            elif token == EOS_ID:
                seq.outcome = Generation(seq.tokens, "eos")
            else:
                seq.add(token)
                if len(seq.tokens) >= seq.budget:
                    seq.outcome = Generation(seq.tokens, "length")
            if seq.outcome is not None:
                finished.append(seq)
        self.remove(finished)
        return finished

    # --- leave -----------------------------------------------------------------------------------

    def remove(self, leaving: list[Sequence]) -> None:
        """Drop rows (finished, cancelled, evicted) from the batch and trim all-padding columns."""
        if not leaving:
            return
        gone = {id(seq) for seq in leaving}
        staying = [row for row, seq in enumerate(self.rows) if id(seq) not in gone]
        if len(staying) == len(self.rows):
            return
        self.rows = [self.rows[row] for row in staying]
        if not self.rows:
            self._cache, self._last = None, None
            return
        keep = torch.tensor(staying, device=self.model.device)
        self._last = self._last[keep]
        old_width = self._cache.layers[0].keys.shape[-2]
        trim = old_width - self.width  # columns that are padding for every remaining row
        for layer in self._cache.layers:
            layer.keys = layer.keys[keep, :, trim:]
            layer.values = layer.values[keep, :, trim:]


def _choose(logits: torch.Tensor, rows: list[Sequence]) -> tuple[torch.Tensor, list[int], list[bool]]:
    """Greedy tokens for a batch with each row's n-gram bans; one device-to-host copy in all.

    Returns the chosen ids on the device (the next step's input), the same ids on the host,
    and per row whether its logits were free of NaN.
    """
    rows_idx, token_idx = [], []
    for row, seq in enumerate(rows):
        banned = seq.guard.banned(seq.tokens)
        rows_idx += [row] * len(banned)
        token_idx += sorted(banned)
    if rows_idx:
        logits = logits.clone()
        where = (torch.tensor(rows_idx, device=logits.device), torch.tensor(token_idx, device=logits.device))
        logits[where] = float("-inf")
    chosen = logits.argmax(dim=-1)  # (rows,)
    nan = torch.isnan(logits).any(dim=-1)  # (rows,)
    tokens, nan_rows = torch.stack([chosen, nan.long()]).tolist()  # the step's one synchronisation
    return chosen, tokens, [not flag for flag in nan_rows]


def _pad_left(states: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, heads, T, dim) -> (rows, heads, width, dim) with zero columns in front."""
    missing = width - states.shape[-2]
    if missing == 0:
        return states
    return torch.nn.functional.pad(states, (0, 0, missing, 0))


def _left_pad(prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
