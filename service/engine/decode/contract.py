"""The contract between the scheduler and a decoder: what a decoding batch promises.

The scheduler holds one :class:`DecodeBatch` and drives it between requests: pages ``join`` it
(prefilled together), every iteration ``step``s it once, pages ``remove`` from it when cancelled or
evicted. Two implementations keep this contract — this process's :class:`~.batch.RunningBatch`
and the vLLM client's :class:`~.vllm_decoder.VllmBatch` — and the scheduler's tests drive a fake one
with no model at all, as vLLM tests its scheduler on fake model outputs.

The decoder's own failures have neutral names here, so that the scheduler and the error table
need not know which decoder raised them. Importable without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .sequence import Sequence


class DecoderDown(RuntimeError):
    """The decoder cannot take work now (down, overloaded, no answer in time): retry later (503)."""


class DecoderRefused(RuntimeError):
    """The decoder answered this page with an error of its own (502): more often a deployment problem
    (flags, model) than the client's."""


class DecodeBatch(Protocol):
    """Rows of :class:`~.sequence.Sequence` decoding together, one token per row per step.

    A sequence that finishes has its ``outcome`` set (a ``Generation``, or the exception that
    ended it for that page alone) and leaves the batch in the same call that finished it.
    """

    rows: list[Sequence]
    """The sequences decoding now, in the order they joined (eviction takes the newest)."""

    @property
    def tokens_in_use(self) -> int:
        """KV slots the batch holds now, padding included: what the scheduler's budget counts."""

    def footprint_with(self, prompt_lengths: list[int]) -> int:
        """KV slots the batch would hold if prompts of these lengths joined now (admission's question)."""

    def join(self, joiners: list[Sequence]) -> list[Sequence]:
        """Prefill ``joiners`` together, choose their first tokens and add them to ``rows``.

        Returns the joiners that already finished (end of text, or a budget of one); they are not in
        ``rows``. If it raises, nothing was added and the rows already there are untouched, so the
        caller may retry with fewer joiners."""

    def step(self) -> list[Sequence]:
        """One token for every row; returns the rows that finished in this step (they have left).

        If it raises, no row advanced and the batch is as it was before the call, so the caller may
        remove rows and step again."""

    def remove(self, leaving: list[Sequence]) -> None:
        """Drop these rows (cancelled, evicted, failed) and free what they held; unknown ones are ignored.
        Their ``outcome`` is the caller's to set."""


@runtime_checkable
class PrefillsInChunks(Protocol):
    """A batch that can prefill a joiner's prompt a chunk at a time between steps (this process's
    :class:`~.batch.RunningBatch`; vLLM schedules its own prefills, so its batch does not)."""

    def prefill_chunk(self, seq: Sequence, max_tokens: int) -> bool:
        """Prefill the next ``max_tokens`` of ``seq``'s prompt into a cache of its own; True once all of it is
        in, and then ``join([seq])`` adds it to the rows. ``remove([seq])`` forgets a partial prefill."""
