"""Loading: the real checkpoint's keys map onto transformers 5.23's classes; presets load
through the same code; failures say how to fix them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from service.engine.weights.config_v1 import translate_v1_config
from service.engine.weights.loading import ModelLoadError, load_model
from service.engine.weights.presets import SHARD_NAME, reference_config, tiny_checkpoint_dir

INDEX = Path(__file__).parent / "data" / "deepseek-ocr-v1.index.json"

# Shapes of the real checkpoint's tensors (design notes, section 2), by key pattern.
EXPECTED_SHAPES = {
    r"model\.embed_tokens\.weight": (129280, 1280),
    r"lm_head\.weight": (129280, 1280),
    r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight": (1280, 1280),
    r"model\.layers\.0\.mlp\.(gate|up)_proj\.weight": (6848, 1280),
    r"model\.layers\.0\.mlp\.down_proj\.weight": (1280, 6848),
    r"model\.layers\.\d+\.mlp\.gate\.weight": (64, 1280),
    r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up)_proj\.weight": (896, 1280),
    r"model\.layers\.\d+\.mlp\.experts\.\d+\.down_proj\.weight": (1280, 896),
    r"model\.layers\.\d+\.mlp\.shared_experts\.(gate|up)_proj\.weight": (1792, 1280),
    r"model\.layers\.\d+\.mlp\.shared_experts\.down_proj\.weight": (1280, 1792),
    r"model\.sam_model\.patch_embed\.proj\.weight": (768, 3, 16, 16),
    r"model\.sam_model\.pos_embed": (1, 64, 64, 768),
    r"model\.sam_model\.blocks\.(2|5|8|11)\.attn\.rel_pos_[hw]": (127, 64),
    r"model\.sam_model\.blocks\.(0|1|3|4|6|7|9|10)\.attn\.rel_pos_[hw]": (27, 64),
    r"model\.sam_model\.blocks\.\d+\.attn\.qkv\.weight": (2304, 768),
    r"model\.sam_model\.net_2\.weight": (512, 256, 3, 3),
    r"model\.sam_model\.net_3\.weight": (1024, 512, 3, 3),
    r"model\.vision_model\.embeddings\.position_embedding\.weight": (257, 1024),
    r"model\.vision_model\.transformer\.layers\.\d+\.self_attn\.qkv_proj\.weight": (3072, 1024),
    r"model\.vision_model\.transformer\.layers\.\d+\.mlp\.fc1\.weight": (4096, 1024),
    r"model\.projector\.layers\.weight": (1280, 2048),
    r"model\.(image_newline|view_seperator)": (1280,),
}


def checkpoint_keys_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The original-checkpoint key names and shapes a model expects, via transformers' own
    conversion mapping run backwards (as save_pretrained does)."""
    from transformers.core_model_loading import revert_weight_conversion

    reverted = revert_weight_conversion(model, dict(model.state_dict()))
    return {key: tuple(tensor.shape) for key, tensor in reverted.items()}


def test_every_real_checkpoint_key_maps_to_a_parameter_of_the_right_shape():
    from transformers import UnlimitedOcrForConditionalGeneration

    index_keys = set(json.loads(INDEX.read_text())["weight_map"])
    assert len(index_keys) == 2710
    with torch.device("meta"):
        model = UnlimitedOcrForConditionalGeneration(translate_v1_config(reference_config()))
    expected = checkpoint_keys_of(model)
    # CLIP's patch conv ships in the checkpoint but is unused (SAM features replace it); the class
    # declares it ignored on load, so it is the one key without a parameter.
    unused = {"model.vision_model.embeddings.patch_embedding.weight"}
    assert unused <= index_keys
    assert (
        "patch_embedding"
        in UnlimitedOcrForConditionalGeneration(
            translate_v1_config(_tiny_raw())
        ).model.vision_tower.vision_encoder._keys_to_ignore_on_load_unexpected
    )
    assert set(expected) == index_keys - unused, (
        f"missing: {sorted(index_keys - unused - set(expected))[:5]}, "
        f"unexpected: {sorted(set(expected) - index_keys)[:5]}"
    )
    checked = 0
    for key, shape in expected.items():
        for pattern, want in EXPECTED_SHAPES.items():
            if re.fullmatch(pattern, key):
                assert shape == want, f"{key}: {shape} != {want}"
                checked += 1
    assert checked > 1500  # most tensors are covered by a shape rule
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 3_336_106_240 - 602_112  # the index total minus the unused patch conv


def _tiny_raw():
    from service.engine.weights.presets import tiny_config

    return tiny_config()


def test_translated_config_is_v1(tmp_path):
    config = translate_v1_config(reference_config())
    text = config.text_config
    assert text.layer_types == ["full_attention"] * 12
    assert text.mlp_layer_types == ["dense"] + ["sparse"] * 11
    assert (text.hidden_size, text.num_attention_heads, text.head_dim) == (1280, 10, 128)
    assert (text.n_routed_experts, text.n_shared_experts, text.num_experts_per_tok) == (64, 2, 6)
    assert text.max_position_embeddings == 8192 and text.rope_parameters["rope_theta"] == 10000.0
    assert list(config.vision_config.sam_config.downsample_channels) == [512, 1024]
    assert config.image_token_id == 128815


def test_tiny_preset_is_a_checkpoint_in_the_official_layout(preset_cache):
    directory = tiny_checkpoint_dir(preset_cache)
    names = {p.name for p in directory.iterdir()}
    assert {
        "config.json",
        SHARD_NAME,
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    } <= names
    raw = json.loads((directory / "config.json").read_text())
    assert raw["model_type"] == "deepseek_vl_v2" and raw["architectures"] == ["DeepseekOCRForCausalLM"]
    families = {re.sub(r"\.\d+\.", ".N.", k) for k in json.loads(INDEX.read_text())["weight_map"]}
    with safe_open(directory / SHARD_NAME, "pt") as handle:
        tiny_keys = set(handle.keys())
        assert {re.sub(r"\.\d+\.", ".N.", k) for k in tiny_keys} == families  # same key names, fewer layers
        stored = handle.get_tensor("model.sam_model.blocks.0.attn.qkv.weight")
    loaded = load_model("tiny", device="cpu", cache_dir=preset_cache)
    sam_qkv = loaded.model.model.vision_tower.sam_encoder.layers[0].attn.qkv.weight
    torch.testing.assert_close(sam_qkv, stored)  # the file's weights, not a fresh random init
    assert loaded.random_weights and loaded.version == "v1"
    vision_params = sum(p.numel() for p in loaded.model.model.vision_tower.parameters())
    assert vision_params < 1_000_000


def test_tiny_tokenizer_keeps_the_real_special_ids(tiny_engine):
    tokenizer = tiny_engine.model.tokenizer
    expected = {
        "<｜begin▁of▁sentence｜>": 0,
        "<｜end▁of▁sentence｜>": 1,
        "<image>": 128815,
        "<|ref|>": 128816,
        "<|/ref|>": 128817,
        "<|det|>": 128818,
        "<|/det|>": 128819,
        "<|grounding|>": 128820,
        "<td>": 128821,
        "</td>": 128822,
    }
    for token, token_id in expected.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    ids = tokenizer.encode("<image>\n<|grounding|>Convert the document to markdown.", add_special_tokens=False)
    assert ids[0] == 128815 and ids[2] == 128820
    assert tokenizer.decode(ids) == "<image>\n<|grounding|>Convert the document to markdown."


def test_missing_directory_and_weights_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not a checkpoint directory"):
        load_model(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text(json.dumps(reference_config()))
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        load_model(str(tmp_path), device="cpu")


def test_partial_checkpoint_is_refused(tmp_path, preset_cache):
    from safetensors.torch import load_file, save_file

    source = tiny_checkpoint_dir(preset_cache)
    for item in source.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    state = load_file(source / SHARD_NAME)
    del state["model.projector.layers.weight"]
    save_file(state, tmp_path / SHARD_NAME, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="refusing to serve partly random weights"):
        load_model(str(tmp_path), device="cpu")


def test_unreachable_hub_says_how_to_predownload(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match=r"hf download deepseek-ai/DeepSeek-OCR"):
        load_model("deepseek-ai/DeepSeek-OCR", device="cpu")


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path is for CPU-only hosts")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model("tiny", device="cuda")
