"""The vision side of the walk: pages -> visual blocks, and the seams the generator uses.

This is the only module that calls into transformers' model classes. The vision tower
and projector run through the model's own ``get_image_features``, which returns each
page's block as ``[local tiles, global view, view separator]`` in the language model's
input space: exactly where RTPrune acts, before ``masked_scatter`` would put it into the
prompt. We call the parts instead of ``forward`` so the pruner can sit in between.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutput

from .layout import block_masks
from .preprocess import PreparedImage, normalise
from .weights.loading import LoadedModel, ModelLoadError


@dataclass(frozen=True)
class VisualBlock:
    """One page's visual tokens after the projector, with their layout.

    ``features`` (n_tokens, hidden) in the model dtype; ``protected``/``newline`` (n_tokens,)
    masks; ``global_view`` (3, S, S) float32 in [-1, 1] for the dynamic ratio.
    """

    features: torch.Tensor
    protected: torch.Tensor
    newline: torch.Tensor
    global_view: torch.Tensor
    page: PreparedImage

    @property
    def n_tokens(self) -> int:
        return self.features.shape[0]


SUPPORTED_ATTENTION = ("sdpa",)


def check_attention(text_config) -> None:
    """Refuse an attention implementation whose padded-batch semantics we have not tested: the running
    batch passes a boolean 4-D mask that SDPA reads as "attend here" and, on torch >= 2.5, gives fully
    masked (pad) rows zeros, not NaN. Eager attention would *add* the mask (True = +1.0, padding
    unmasked) and FlashAttention-2 wants a 2-D mask: both would silently decode padded rows wrong."""
    implementation = getattr(text_config, "_attn_implementation", None)
    if implementation not in SUPPORTED_ATTENTION:
        raise ModelLoadError(
            f"attention implementation {implementation!r} is not supported: left-padded batches are tested "
            f"only with {', '.join(SUPPORTED_ATTENTION)}"
        )


class OcrModel:
    """Thin adapter over the transformers model: encode pages, embed ids, run the decoder."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.version = loaded.version
        self.device = loaded.device
        self.dtype = loaded.dtype
        text_config = self.model.config.text_config
        self.text_config = text_config
        check_attention(text_config)
        self.max_positions: int = text_config.max_position_embeddings
        # ids the tokenizer cannot decode (the embedding has 129,280 rows, the tokenizer 128,827)
        self.vocab_limit: int = min(len(self.tokenizer), text_config.vocab_size)

    @torch.inference_mode()
    def encode(self, pages: list[PreparedImage]) -> list[VisualBlock]:
        """Run the vision tower and projector over pages that share a global-view size."""
        sizes = {page.global_view.shape for page in pages}
        assert len(sizes) == 1, f"pages in one encoder call must share a global view size, got {sizes}"
        views = [self._on_device(p.global_view) for p in pages]  # float32 in [-1, 1], on the device
        local = [p.tiles for p in pages if p.tiles is not None]
        tiles = self._on_device(torch.cat(local)).to(self.dtype) if local else None
        return self._features(pages, views, tiles)

    @torch.inference_mode()
    def encode_in_pieces(self, page: PreparedImage) -> Generator[None, None, VisualBlock]:
        """:meth:`encode` for one page in pieces, yielding between them: the vision tower over the global view,
        then over each tile, each view a SAM layer at a time (a global-attention layer over a 1024-px view is
        the largest piece). So a caller (the scheduler) can run a decode step between two pieces. The block
        is put together by the model's own ``get_image_features`` (which owns the layout: tile grid,
        newlines, separator) over the towers' outputs, replayed; the projector runs there. Equal to
        :meth:`encode` up to the floating-point order of a batched call."""
        view = self._on_device(page.global_view)
        outputs = [(yield from self._tower_in_pieces(view[None].to(self.dtype)))]
        tiles = None
        if page.tiles is not None:
            tiles = self._on_device(page.tiles).to(self.dtype)
            local = []
            for tile in tiles:
                local.append((yield from self._tower_in_pieces(tile[None])).last_hidden_state)
            outputs.append(BaseModelOutput(last_hidden_state=torch.cat(local)))
        with _replayed(self.model.model, "vision_tower", outputs):
            return self._features([page], [view], tiles)[0]

    def _tower_in_pieces(self, pixels: torch.Tensor) -> Generator[None, None, BaseModelOutput]:
        """The vision tower over one view, yielding after each of its SAM encoder's layers. SAM's steps are
        called here in the order of its ``forward`` (patch embedding, position embedding, layers, neck,
        projection; the same in v1 and v2), then the tower's own ``forward`` runs the rest (CLIP, or v2's
        query encoder) over SAM's output, replayed. Tested equal to the tower called whole."""
        tower = self.model.model.vision_tower
        sam = tower.sam_encoder
        hidden = sam.patch_embed(pixels)
        if sam.pos_embed is not None:
            hidden = hidden + sam.interpolate_pos_encoding(hidden.shape[1], hidden.shape[2])
        for layer in sam.layers:
            hidden = layer(hidden)
            yield
        encoded = BaseModelOutput(last_hidden_state=sam.proj(sam.neck(hidden)))
        with _replayed(tower, "sam_encoder", [encoded]):
            return tower(pixels)

    def _features(
        self, pages: list[PreparedImage], views: list[torch.Tensor], tiles: torch.Tensor | None
    ) -> list[VisualBlock]:
        """``get_image_features`` over the pages' global views (and their tiles, all pages' in order): each
        page's block as ``[local tiles, global view, view separator]``, with its layout masks."""
        kwargs = {}
        if tiles is not None:
            kwargs["pixel_values_local"] = tiles  # (n_tiles, 3, T, T)
            kwargs["num_local_patches"] = [p.num_tiles for p in pages]
            if self.version == "v1":
                kwargs["patches_grid"] = [list(p.grid) if p.grid else [1, 1] for p in pages]
        pixel_values = torch.stack(views).to(self.dtype)  # (B, 3, S, S)
        output = self.model.model.get_image_features(pixel_values, **kwargs, return_dict=True)
        blocks = []
        for page, view, features in zip(pages, views, output.pooler_output, strict=True):
            protected, newline = block_masks(page, self.version)
            assert features.shape[0] == protected.numel(), (
                f"encoder returned {features.shape[0]} tokens, layout expects {protected.numel()}"
            )
            blocks.append(VisualBlock(features, protected.to(self.device), newline.to(self.device), view, page))
        return blocks

    def _on_device(self, pixels: torch.Tensor) -> torch.Tensor:
        """A view (or stack of tiles) as float32 in [-1, 1] on the device: uint8 pixels are normalised
        there (a quarter of the bytes cross), float ones are already normalised."""
        if pixels.dtype == torch.uint8:
            return normalise(pixels, self.device)
        return pixels.to(self.device)

    def vision_bytes(self, page: PreparedImage) -> int:
        """An estimate of the transient memory encoding ``page`` takes: SAM's global-attention layers
        materialise a (heads, T, T) relative-position bias for each view of T patches — about 0.4 GB for
        a 1024-px view and 1 GB for a 1280-px one in bf16 — and that, not the weights, is what several
        pages in one vision call add up. Bounds a call (:attr:`OCREngine.max_vision_bytes`); not measured."""
        sam = getattr(self.model.config.vision_config, "sam_config", None)
        heads, patch = getattr(sam, "num_attention_heads", 12), getattr(sam, "patch_size", 16)
        tiles = [page.tiles.shape[-1]] * page.num_tiles if page.tiles is not None else []
        sides = [page.global_view.shape[-1], *tiles]
        return sum(heads * ((side // patch) ** 2) ** 2 * self.dtype.itemsize for side in sides)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (..., hidden) in the model dtype."""
        return self.model.get_input_embeddings()(input_ids.to(self.device))

    def mask_argument(self, mask: torch.Tensor | None):
        """The decoder's ``attention_mask`` for a 4-D mask built here (None: causal, nothing padded). v1's
        decoder takes one mask per attention kind and then builds none itself (it would also build a
        sliding-window mask no layer uses, every forward); v2's takes the mask as it is."""
        return {"full_attention": mask} if self.version == "v1" else mask

    def decoder(self, **kwargs):
        """The language model's decoder stack (no LM head): prefill and decode steps call this."""
        return self.model.model.language_model(**kwargs)

    def kv_bytes_per_token(self) -> int:
        """Bytes the KV cache holds per token: K and V of every layer, each kv-heads x head-dim in the model
        dtype (MHA: v1 refuses MLA configs). From the config, so it needs no decoder layer (the vLLM
        decoder frees them) and no forward."""
        config = self.text_config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return 2 * config.num_hidden_layers * kv_heads * head_dim * self.dtype.itemsize

    def release_decoder_layers(self) -> None:
        """Free the decoder stack when another process decodes (a vLLM server): the walk here needs only
        the vision side and the token embeddings, and the layers are most of the model's memory."""
        self.model.model.language_model.layers = torch.nn.ModuleList()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head over hidden states, in float32, with undecodable ids masked out."""
        logits = self.model.lm_head(hidden).float()
        logits[..., self.vocab_limit :] = float("-inf")
        return logits


class _Replay(torch.nn.Module):
    """Stands in for a submodule: returns outputs computed before, in the order they were computed."""

    def __init__(self, outputs: list[BaseModelOutput]) -> None:
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutput:
        return self.outputs.pop(0)


@contextmanager
def _replayed(module: torch.nn.Module, name: str, outputs: list[BaseModelOutput]) -> Iterator[None]:
    """``module.<name>`` answers with ``outputs`` for the duration, so the module's own ``forward`` (or
    ``get_image_features``) puts together what ran in pieces before, without its layout restated here."""
    original = getattr(module, name)
    setattr(module, name, _Replay(outputs))
    try:
        yield
    finally:
        setattr(module, name, original)
