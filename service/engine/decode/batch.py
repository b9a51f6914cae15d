"""A decoding batch whose rows join and leave between steps: iteration-level batching.

transformers' own continuous-batching manager takes token ids with contiguous positions
and shows its logits processors only the last token, so it cannot carry our pruned
embeddings, gapped position ids or the windowed n-gram guard. This module runs the model's
decoder over its own KV cache (:mod:`.slots`: per-layer slot buffers written in place):

- **join**: new sequences are prefilled together in a cache of their own (left-padded
  among themselves; a sequence that was evicted prefills its prompt plus the tokens it had
  already generated), their next token is chosen, and only their K/V is copied into free
  slots of the batch's cache. Every row carries its own position ids and a mask of its own
  columns, so a row computes what it would alone.
- **step**: one token for every row in one forward, written in place at each row's length;
  the n-gram bans are computed before the forward is launched, and the greedy choice, the bans
  and a NaN check run on the whole batch with a single device-to-host copy per step.
- **leave**: finished or cancelled rows free their slots (the last row moves into a hole).

Masks are built here from lengths the host knows, and handed over so that the model builds
none of its own (v1 would also build a sliding-window mask no layer uses, every forward).

A step that raises (e.g. out of memory half-way through the layers) leaves the cache as
it was before the step, so the caller may evict rows and try again.

``cache="padded"`` keeps the earlier layout (one left-padded ``DynamicCache`` concatenated at
every step and join) for the benchmark that compares the two (``bench/decode_step.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache

from ..assemble import PromptInputs, extend_prompt
from ..device import on_device
from ..model import OcrModel
from ..stats import shared_stage
from .sequence import EOS_ID, Generation, Sequence
from .slots import SlotCache

CacheLayout = Literal["slots", "padded"]


class NonFiniteLogits(RuntimeError):
    """The model produced NaN logits for one page (e.g. corrupt features); that page fails alone."""


@dataclass
class _Partial:
    """A joiner's prompt prefilled so far, chunk by chunk, in a cache of its own."""

    inputs: PromptInputs
    cache: DynamicCache
    done: int = 0  # positions prefilled
    last_hidden: torch.Tensor | None = None  # (1, hidden) of the last position prefilled

    @property
    def complete(self) -> bool:
        return self.done == self.inputs.length


class RunningBatch:
    """Rows of :class:`Sequence` decoding together over one KV cache (keeps :class:`~.contract.DecodeBatch`)."""

    def __init__(self, model: OcrModel, cache: CacheLayout = "slots") -> None:
        self.model = model
        self.layout = cache
        self.rows: list[Sequence] = []  # in the order they joined (eviction takes the newest)
        self._slots: list[Sequence] = []  # in cache order: row i of the cache and of _last
        self._cache: SlotCache | DynamicCache | None = None
        self._last: torch.Tensor | None = None  # (rows,) last chosen token per row, cache order, on the device
        self._partial: dict[int, _Partial] = {}  # id(sequence) -> its prompt prefilled so far, chunk by chunk

    # --- bookkeeping, all on the host -------------------------------------------------------

    @property
    def width(self) -> int:
        """Cached columns of the longest row."""
        return max((self._cached(seq) for seq in self.rows), default=0)

    @property
    def tokens_in_use(self) -> int:
        """KV slots the batch spans: rows x the longest row (what the budget counts)."""
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
        """Prefill ``joiners`` together, choose their next tokens and add them to the batch.

        Returns the sequences that already finished (eos or a budget of one); they do not stay.
        On an exception nothing was added and the running rows are untouched.
        """
        for seq in joiners:
            seq.budget = min(seq.budget, self.model.max_positions - seq.prompt.next_position)
            assert seq.budget >= 1, "the engine checks that a prompt leaves room to generate"
        bans = _bans(joiners, self.model.device)
        partial = self._partial.get(id(joiners[0]))
        if partial is not None:  # prefilled chunk by chunk (:meth:`prefill_chunk`): only its first token is left
            assert len(joiners) == 1 and partial.complete, "a page prefilled in chunks joins alone, once complete"
            cache, pads = partial.cache, [0]
            with shared_stage([joiners[0].timer], "prefill", self.model.device):
                chosen, tokens, finite = _choose(self.model.logits(partial.last_hidden), bans)
        else:
            cache = DynamicCache(config=self.model.text_config)
            inputs = [self.prefill_inputs(seq) for seq in joiners]
            embeds, positions, pads = _left_pad(inputs)
            with shared_stage([seq.timer for seq in joiners], "prefill", self.model.device):
                out = self.model.decoder(
                    inputs_embeds=embeds,
                    position_ids=positions,
                    attention_mask=self.model.mask_argument(_prefill_mask(pads, embeds.shape[1], self.model.device)),
                    past_key_values=cache,
                    use_cache=True,
                )
                logits = self.model.logits(out.last_hidden_state[:, -1])  # (joiners, vocab)
                chosen, tokens, finite = _choose(logits, bans)
        self._partial.pop(id(joiners[0]), None)
        self._add(cache, joiners, pads)
        self._last = chosen if self._last is None else torch.cat([self._last, chosen])
        return self._advance(joiners, tokens, finite, span=None)

    @torch.inference_mode()
    def prefill_chunk(self, seq: Sequence, max_tokens: int) -> bool:
        """Prefill the next ``max_tokens`` of ``seq``'s prompt (with the tokens it generated, after an eviction)
        into a cache of its own, after the chunks before; True once the whole prompt is in, and then
        :meth:`join` adds it with the first token chosen. Each chunk attends to the chunks before it and
        causally within itself, so the cache is the one a single prefill makes (chunked prefill, as
        Sarathi-Serve and vLLM do it): the scheduler runs one chunk between two decode steps. If a chunk
        raises, the page's partial prefill is dropped (it starts again from its first chunk)."""
        partial = self._partial.get(id(seq))
        if partial is None:
            cache = DynamicCache(config=self.model.text_config)
            partial = self._partial[id(seq)] = _Partial(self.prefill_inputs(seq), cache)
        start = partial.done
        end = min(start + max_tokens, partial.inputs.length)
        try:
            with shared_stage([seq.timer], "prefill", self.model.device):
                out = self.model.decoder(
                    inputs_embeds=partial.inputs.embeds[None, start:end],
                    position_ids=partial.inputs.position_ids[None, start:end],
                    attention_mask=self.model.mask_argument(_chunk_mask(start, end, self.model.device)),
                    past_key_values=partial.cache,
                    use_cache=True,
                )
        except BaseException:
            del self._partial[id(seq)]
            raise
        partial.done, partial.last_hidden = end, out.last_hidden_state[:, -1]
        return partial.complete

    def prefill_inputs(self, seq: Sequence) -> PromptInputs:
        """What a joiner prefills: its prompt, plus the tokens it already generated when it rejoins after an
        eviction (so the text streamed before is the text it goes on from, even where bf16 GEMMs would
        not reproduce it)."""
        if not seq.tokens:
            return seq.prompt
        return extend_prompt(seq.prompt, self.model.embed(torch.tensor(seq.tokens, device=self.model.device)))

    def _add(self, prefilled: DynamicCache, joiners: list[Sequence], pads: list[int]) -> None:
        if self.layout == "slots":
            if self._cache is None:
                self._cache = SlotCache(len(prefilled.layers))
            self._cache.append(prefilled, pads)
        elif self._cache is None or not self.rows:
            self._cache = prefilled
        else:  # the padded layout: left-pad both caches to one width and concatenate every layer
            width = max(self.width, prefilled.layers[0].keys.shape[-2])
            for mine, theirs in zip(self._cache.layers, prefilled.layers, strict=True):
                mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
                mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.rows += joiners
        self._slots += joiners

    # --- step ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Feed every row its last token, choose the next; return the rows that finished (and left)."""
        if not self.rows:
            return []
        started = time.perf_counter()
        rows = list(self._slots)
        positions = on_device([[seq.prompt.next_position + len(seq.tokens) - 1] for seq in rows], self.model.device)
        bans = _bans(rows, self.model.device)  # before the forward: the host does not wait for it
        width = self.width
        if self.layout == "slots":
            self._cache.begin_step(self.model.device)
        try:
            out = self.model.decoder(
                inputs_embeds=self.model.embed(self._last[:, None]),  # (rows, 1, hidden)
                position_ids=positions,  # (rows, 1)
                attention_mask=self.model.mask_argument(self._step_mask(rows, width + 1)),
                past_key_values=self._cache,
                use_cache=True,
            )
            logits = self.model.logits(out.last_hidden_state[:, -1])  # (rows, vocab)
            chosen, tokens, finite = _choose(logits, bans)
        except BaseException:
            if self.layout == "padded":
                self._crop(width)  # layers that already appended this step's column give it back
            raise  # slots: the lengths did not move, so the columns written are free again
        if self.layout == "slots":
            self._cache.end_step()
        self._last = chosen
        return self._advance(rows, tokens, finite, span=(started, time.perf_counter()))

    def _step_mask(self, rows: list[Sequence], width: int) -> torch.Tensor | None:
        """(rows, 1, 1, width) bool, True for each row's own columns; None when no row is padded. Built
        from lengths the host knows, 4-D so transformers uses it as it is (its 2-D path asks the device
        whether the mask is all ones: a synchronisation per step)."""
        lengths = [self._cached(seq) + 1 for seq in rows]
        if all(n == width for n in lengths):
            return None
        columns = torch.arange(width, device=self.model.device)[None, :]
        if self.layout == "slots":  # right-padded: a row's tokens are its first columns, and the one it writes
            return (columns <= self._cache.write_columns[:, None])[:, None, None, :]  # already on the device
        sizes = on_device(lengths, self.model.device)[:, None]
        return (columns >= width - sizes)[:, None, None, :]  # left-padded: its last columns

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

    @torch.inference_mode()  # the cache's buffers are inference tensors: updated in place only in this mode
    def remove(self, leaving: list[Sequence]) -> None:
        """Drop rows (finished, cancelled, evicted) from the batch and free what they held."""
        gone = {id(seq) for seq in leaving}
        for key in gone & self._partial.keys():
            del self._partial[key]  # a page that leaves while its prompt is prefilled in chunks
        slots = [i for i, seq in enumerate(self._slots) if id(seq) in gone]
        if not slots:
            return
        self.rows = [seq for seq in self.rows if id(seq) not in gone]
        if not self.rows:
            self._cache, self._last, self._slots = None, None, []
            return
        if self.layout == "slots":
            order = self._cache.remove(slots)  # slot i now holds what slot order[i] held
        else:
            order = [i for i in range(len(self._slots)) if i not in set(slots)]
            old_width = self._cache.layers[0].keys.shape[-2]
            keep = torch.tensor(order, device=self.model.device)
            trim = old_width - self.width  # columns that are padding for every remaining row
            for layer in self._cache.layers:
                layer.keys = layer.keys[keep, :, trim:]
                layer.values = layer.values[keep, :, trim:]
        self._slots = [self._slots[i] for i in order]
        self._last = self._last[torch.tensor(order, device=self.model.device)]


def _bans(rows: list[Sequence], device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row, token) pairs each row's n-gram guard forbids next, on the device; None when nothing is banned."""
    rows_idx, token_idx = [], []
    for row, seq in enumerate(rows):
        banned = seq.guard.banned(seq.tokens)
        rows_idx += [row] * len(banned)
        token_idx += sorted(banned)
    if not rows_idx:
        return None
    both = on_device([rows_idx, token_idx], device)  # one copy for both
    return both[0], both[1]


def _choose(
    logits: torch.Tensor, bans: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, list[int], list[bool]]:
    """Greedy tokens for a batch with each row's n-gram bans; one device-to-host copy in all.

    Returns the chosen ids on the device (the next step's input), the same ids on the host,
    and per row whether its logits were free of NaN.
    """
    if bans is not None:
        logits = logits.index_put(bans, torch.tensor(float("-inf"), device=logits.device))
    chosen = logits.argmax(dim=-1)  # (rows,)
    nan = torch.isnan(logits).any(dim=-1)  # (rows,)
    tokens, nan_rows = torch.stack([chosen, nan.long()]).tolist()  # the step's one synchronisation
    return chosen, tokens, [not flag for flag in nan_rows]


def _prefill_mask(pads: list[int], length: int, device: torch.device) -> torch.Tensor | None:
    """(B, 1, L, L) bool: causal and blind to each row's left padding; None when no row is padded (the
    plain causal path). A padding position attends to itself, so no row of the attention is empty."""
    if not any(pads):
        return None
    positions = torch.arange(length, device=device)
    causal = positions[None, :] <= positions[:, None]  # (L, L)
    real = positions[None, :] >= on_device(pads, device)[:, None]  # (B, L)
    mask = (causal[None] & real[:, None, :]) | torch.eye(length, dtype=torch.bool, device=device)[None]
    return mask[:, None]


def _chunk_mask(start: int, end: int, device: torch.device) -> torch.Tensor | None:
    """(1, 1, end - start, end) bool for a chunk of a prompt whose first ``start`` positions are cached: each
    new position sees the cached ones and those before it in the chunk. None for the first chunk (plain
    causal: SDPA's own causal mask is aligned top-left, right only when nothing is cached)."""
    if start == 0:
        return None
    rows = torch.arange(start, end, device=device)[:, None]
    return (torch.arange(end, device=device)[None, :] <= rows)[None, None]


def _pad_left(states: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, heads, T, dim) -> (rows, heads, width, dim) with zero columns in front."""
    missing = width - states.shape[-2]
    if missing == 0:
        return states
    return torch.nn.functional.pad(states, (0, 0, missing, 0))


def _left_pad(prompts: list[PromptInputs]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Stack prompts right-aligned: embeds (B, L, hidden), position ids (B, L), and each row's padding."""
    length = max(p.length for p in prompts)
    first = prompts[0].embeds
    embeds = first.new_zeros(len(prompts), length, first.shape[-1])
    positions = torch.zeros(len(prompts), length, dtype=torch.long, device=first.device)
    for row, prompt in enumerate(prompts):
        embeds[row, length - prompt.length :] = prompt.embeds
        positions[row, length - prompt.length :] = prompt.position_ids
    return embeds, positions, [length - p.length for p in prompts]
