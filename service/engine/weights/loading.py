"""Find the weights (hub id, local directory or preset) and build the transformers model.

One path for every source: a directory laid out like ``deepseek-ai/DeepSeek-OCR`` (its
``config.json`` as shipped, safetensors with the original key names, tokenizer files).
A hub id is first materialised into the HF cache with ``snapshot_download``; the ``tiny``
preset is such a directory that we write ourselves. Nothing silently falls back to
random weights: a missing or partial checkpoint is an error that says how to fix it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..device import prepare_device
from ..names import DEFAULT_MODEL, RANDOM_PRESETS, near_presets
from .config_v1 import is_v1_config, translate_v1_config
from .presets import reference_config, seed_random_weights, tiny_checkpoint_dir

log = logging.getLogger(__name__)


_HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to do about it."""


@dataclass
class LoadedModel:
    """The transformers model and tokenizer, plus what the rest of the engine needs to know."""

    model: Any  # UnlimitedOcrForConditionalGeneration | DeepseekOcr2ForConditionalGeneration
    tokenizer: Any
    name: str
    version: str  # "v1" | "v2"
    device: torch.device
    dtype: torch.dtype
    random_weights: bool


def resolve_device(device: str | None) -> torch.device:
    """CUDA when available, else CPU; an explicit choice must exist."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was requested but CUDA is not available; use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ModelLoadError(
            f"device {device!r} was requested but this process sees {count} GPU(s), cuda:0 to cuda:{count - 1} "
            "(CUDA_VISIBLE_DEVICES renumbers them from 0)"
        )
    return resolved


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA, float32 on CPU, unless asked otherwise."""
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of bf16, fp16, fp32") from None


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | None = None,
    cache_dir: Path | None = None,
    memory_fraction: float | None = None,
) -> LoadedModel:
    """Load DeepSeek-OCR (v1 or v2) from a hub id, a local directory, or a preset name. ``memory_fraction``
    caps this process's share of a GPU (see :func:`..device.prepare_device`)."""
    quiet_loading()
    torch_device = prepare_device(resolve_device(device), memory_fraction=memory_fraction)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if model == "random-full":
        return _load_random_full(torch_device, torch_dtype, cache_dir)
    directory = tiny_checkpoint_dir(cache_dir, model) if model in ("tiny", "tiny-v2") else _checkpoint_directory(model)
    return _load_directory(directory, torch_device, torch_dtype, name=model, random_weights=model in RANDOM_PRESETS)


def quiet_loading() -> None:
    """No "Loading weights" / "Writing model shards" progress bars: they take a second at most, print on
    every CLI run and fill server logs. The hub's download bar (minutes, once) is another and stays."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _checkpoint_directory(model: str) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json; point --model at a copy of the checkpoint repository")
        return path
    if path.exists() or model.startswith((".", "/", "~")):
        raise ModelLoadError(f"{model} is not a checkpoint directory")
    if "/" not in model:  # every DeepSeek-OCR hub id is org/name: this is a typo or a missing directory
        guess = near_presets(model)
        hint = f"did you mean {' or '.join(repr(g) for g in guess)}? " if guess else ""
        raise ModelLoadError(
            f"unknown model {model!r}: {hint}give a hub id (org/name, e.g. {DEFAULT_MODEL}), a checkpoint "
            f"directory, or a random preset ({', '.join(RANDOM_PRESETS)})"
        )
    return _download(model)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    how_to = (
        f"Pre-download it on a connected machine with `hf download {repo_id}` (it lands in the HF cache; "
        "mount that cache and set HF_HUB_OFFLINE=1), or pass --model /path/to/a/local/copy. "
        "To try the service without weights, ask for the random `tiny` preset explicitly."
    )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(
            f"model {repo_id!r} was not found on the Hugging Face hub (or is private). {how_to}"
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"model {repo_id!r} is not in the local HF cache and the hub cannot be reached. {how_to}"
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelLoadError(f"could not download {repo_id!r}: {exc}. {how_to}") from exc


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {directory / 'config.json'}: {exc}") from exc


def _model_class_and_config(raw: dict[str, Any], directory: Path) -> tuple[type, Any, str]:
    if is_v1_config(raw):
        from transformers import UnlimitedOcrForConditionalGeneration

        return UnlimitedOcrForConditionalGeneration, translate_v1_config(raw), "v1"
    if raw.get("model_type") == "deepseek_ocr2":
        from transformers import AutoConfig, DeepseekOcr2ForConditionalGeneration

        return DeepseekOcr2ForConditionalGeneration, AutoConfig.from_pretrained(directory), "v2"
    raise ModelLoadError(
        f"{directory / 'config.json'} is neither DeepSeek-OCR (model_type deepseek_vl_v2) nor DeepSeek-OCR-2 "
        f"(model_type deepseek_ocr2); got model_type {raw.get('model_type')!r}"
    )


def _load_directory(
    directory: Path, device: torch.device, dtype: torch.dtype, *, name: str, random_weights: bool
) -> LoadedModel:
    raw = _read_config(directory)
    model_cls, config, version = _model_class_and_config(raw, directory)
    if not any(directory.glob("*.safetensors")):
        raise ModelLoadError(
            f"{directory} has no *.safetensors weights; the download may be incomplete (run `hf download` again)"
        )
    model, info = model_cls.from_pretrained(  # straight onto the device: no second full copy in host memory
        directory, config=config, dtype=dtype, device_map=device, attn_implementation="sdpa", output_loading_info=True
    )
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ModelLoadError(
            f"checkpoint {directory} does not fit {model_cls.__name__}: {len(info['missing_keys'])} missing and "
            f"{len(info['mismatched_keys'])} mismatched tensors (e.g. {sorted(info['missing_keys'])[:3]}); "
            "refusing to serve partly random weights"
        )
    tokenizer = load_tokenizer(directory)
    model = model.eval().requires_grad_(False)  # inference only: no autograd bookkeeping anywhere
    return LoadedModel(model, tokenizer, name, version, device, dtype, random_weights)


def load_tokenizer(directory: Path):
    """The checkpoint's byte-level BPE ``tokenizer.json`` in transformers' tokenizers backend.

    This is the class ``AutoTokenizer`` resolves to for these files, named directly: through
    ``AutoTokenizer`` the shipped ``tokenizer_config.json`` (``LlamaTokenizerFast``, an
    ``auto_map`` of remote code, ``model_type`` deepseek_vl_v2) costs two alarming warnings at
    every start and, without ``trust_remote_code=False``, a prompt that would hang a server."""
    from transformers import TokenizersBackend

    return TokenizersBackend.from_pretrained(directory)


def _load_random_full(device: torch.device, dtype: torch.dtype, cache_dir: Path | None) -> LoadedModel:
    """The real architecture and config with random weights, for benchmarks (compute cost does not
    depend on the values). Built directly in the target dtype on the target device; transformers'
    own init is skipped since every tensor is overwritten by the seeded one anyway."""
    from transformers import UnlimitedOcrForConditionalGeneration
    from transformers.initialization import no_init_weights

    config = translate_v1_config(reference_config())
    config._attn_implementation = "sdpa"
    with torch.device(device), no_init_weights():
        model = UnlimitedOcrForConditionalGeneration._from_config(config, dtype=dtype)
    seed_random_weights(model, seed=0)
    tokenizer = load_tokenizer(tiny_checkpoint_dir(cache_dir))
    log.warning("model random-full has random weights: its output text is meaningless")
    return LoadedModel(model.eval().requires_grad_(False), tokenizer, "random-full", "v1", device, dtype, True)
