"""Translate DeepSeek-OCR v1's shipped ``config.json`` into transformers 5.23's classes.

The checkpoint ships a remote-code config (``model_type: deepseek_vl_v2``) that 5.23 cannot
read, but ``UnlimitedOcr*`` computes exactly v1 once every text layer is full attention,
and its conversion mapping loads v1's original weight names. So users point us at the
untouched checkpoint; only its config is translated, here, in memory.

The SAM and CLIP sizes are hard-coded in v1's remote code; ``vision_config.width`` names
them. The few sizes it does not name (SAM's MLP and neck widths, CLIP's MLP width) default
to v1's values and may be given there, which the random ``tiny`` preset does.
"""

from __future__ import annotations

from typing import Any

from transformers import UnlimitedOcrConfig

V1_MODEL_TYPES = {"deepseek_vl_v2", "DeepseekOCR"}
V1_ARCHITECTURES = {"DeepseekOCRForCausalLM"}

_TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "topk_method",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
)


def is_v1_config(raw: dict[str, Any]) -> bool:
    """True for the config.json that ships with deepseek-ai/DeepSeek-OCR (or a copy of it)."""
    return raw.get("model_type") in V1_MODEL_TYPES or bool(V1_ARCHITECTURES & set(raw.get("architectures", [])))


def translate_v1_config(raw: dict[str, Any]) -> UnlimitedOcrConfig:
    """Build the equivalent ``UnlimitedOcrConfig`` (all text layers full attention)."""
    language = raw.get("language_config") or raw
    if language.get("use_mla"):
        raise ValueError("this config uses MLA attention; DeepSeek-OCR v1 uses plain multi-head attention")
    width = raw["vision_config"]["width"]
    sam, clip = width["sam_vit_b"], width["clip-l-14-224"]
    n_layers = language["num_hidden_layers"]
    text_config = {key: language[key] for key in _TEXT_KEYS if key in language}
    text_config.update(
        layer_types=["full_attention"] * n_layers,  # v1 has no R-SWA: this makes Unlimited-OCR compute v1
        mlp_layer_types=[
            "dense" if i < language.get("first_k_dense_replace", 1) else "sparse" for i in range(n_layers)
        ],
        rms_norm_eps=language.get("rms_norm_eps", 1e-6),
        routed_scaling_factor=language.get("routed_scaling_factor", 1.0),
    )
    sam_config = {
        "hidden_size": sam["width"],
        "num_hidden_layers": sam["layers"],
        "num_attention_heads": sam["heads"],
        "global_attn_indexes": sam["global_attn_indexes"],
        "downsample_channels": sam["downsample_channels"],
        "mlp_dim": sam.get("mlp_dim", 4 * sam["width"]),
        "output_channels": sam.get("output_channels", 256),
        "image_size": raw["vision_config"].get("image_size", 1024),
    }
    encoder_config = {
        "hidden_size": clip["width"],
        "num_hidden_layers": clip["layers"],
        "num_attention_heads": clip["heads"],
        "intermediate_size": clip.get("intermediate_size", 4 * clip["width"]),
        "image_size": clip["image_size"],
        "patch_size": clip["patch_size"],
    }
    projector = raw.get("projector_config", {})
    expected_in = sam["downsample_channels"][-1] + clip["width"]
    if projector and (projector.get("input_dim"), projector.get("n_embed")) != (expected_in, language["hidden_size"]):
        raise ValueError(
            f"projector_config {projector} does not match the encoders: expected input_dim {expected_in} "
            f"and n_embed {language['hidden_size']}"
        )
    return UnlimitedOcrConfig(
        vision_config={"sam_config": sam_config, "encoder_config": encoder_config},
        text_config=text_config,
        image_token_id=raw.get("image_token_id", 128815),
        tie_word_embeddings=False,
    )
