"""Put the kept visual tokens into the prompt and number the positions.

Two position schemes, both exact under the KV cache:

- ``original`` (the authors'): every token keeps the position it had in the unpruned
  prompt, so kept visual tokens have gaps between them, and generated tokens continue
  from the unpruned prompt length.
- ``compact``: positions 0..L-1 over the pruned prompt, generation continues at L.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .names import Positions


@dataclass(frozen=True)
class PromptInputs:
    """Prefill inputs of one request: ``embeds`` (L, hidden), ``position_ids`` (L,), and the
    position the first generated token takes."""

    embeds: torch.Tensor
    position_ids: torch.Tensor
    next_position: int

    @property
    def length(self) -> int:
        return self.embeds.shape[0]


def assemble_prompt(
    text_embeds: torch.Tensor,
    image_start: int,
    n_visual: int,
    visual_features: torch.Tensor,
    kept_indices: torch.Tensor,
    positions: Positions | str = Positions.original,
) -> PromptInputs:
    """Replace the ``n_visual`` placeholders at ``image_start`` by the kept visual tokens.

    Parameters
    ----------
    text_embeds : Tensor, shape (L_full, hidden)
        Embeddings of the unpruned prompt (placeholders included).
    visual_features : Tensor, shape (n_kept, hidden)
        Pruned visual block; ``kept_indices`` (n_kept,) says where each token sat.
    """
    full_length = text_embeds.shape[0]
    head = text_embeds[:image_start]  # (image_start, hidden)
    tail = text_embeds[image_start + n_visual :]  # (L_full - image_start - n_visual, hidden)
    embeds = torch.cat([head, visual_features.to(text_embeds.dtype), tail])  # (L, hidden)
    device = text_embeds.device
    if Positions(positions) is Positions.compact:
        return PromptInputs(embeds, torch.arange(embeds.shape[0], device=device), embeds.shape[0])
    position_ids = torch.cat(
        [
            torch.arange(image_start, device=device),
            image_start + kept_indices.to(device),
            torch.arange(image_start + n_visual, full_length, device=device),
        ]
    )  # (L,)
    return PromptInputs(embeds, position_ids, full_length)


def extend_prompt(prompt: PromptInputs, token_embeds: torch.Tensor) -> PromptInputs:
    """The prompt followed by tokens already generated (``token_embeds`` (n, hidden)) at the positions they
    were generated at: what a page that rejoins after an eviction prefills, so it goes on from its last
    token instead of generating its text again (vLLM's recompute preemption does the same)."""
    n = token_embeds.shape[0]
    device = prompt.embeds.device
    generated = torch.arange(prompt.next_position, prompt.next_position + n, device=device)
    embeds = torch.cat([prompt.embeds, token_embeds.to(device, prompt.embeds.dtype)])
    return PromptInputs(embeds, torch.cat([prompt.position_ids, generated]), prompt.next_position + n)
