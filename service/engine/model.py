"""The vision side of the walk: pages -> visual blocks, and the seams the generator uses.

This is the only module that calls into transformers' model classes. The vision tower
and projector run through the model's own ``get_image_features``, which returns each
page's block as ``[local tiles, global view, view separator]`` in the language model's
input space: exactly where RTPrune acts, before ``masked_scatter`` would put it into the
prompt. We call the parts instead of ``forward`` so the pruner can sit in between.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
        pixel_values = torch.stack(views).to(self.dtype)  # (B, 3, S, S)
        local = [p.tiles for p in pages if p.tiles is not None]
        kwargs = {}
        if local:
            kwargs["pixel_values_local"] = self._on_device(torch.cat(local)).to(self.dtype)  # (n_tiles, 3, T, T)
            kwargs["num_local_patches"] = [p.num_tiles for p in pages]
            if self.version == "v1":
                kwargs["patches_grid"] = [list(p.grid) if p.grid else [1, 1] for p in pages]
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
