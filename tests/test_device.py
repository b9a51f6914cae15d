"""First contact with a GPU, proven on the CPU: the failures a first CUDA deployment would meet, each
reproduced here with the device fact injected (free memory, a sticky CUDA error, a library's allocation
failure, an attention implementation, bf16 padding) and shown to be handled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.engine import OCREngine, OcrOptions
from service.engine.decode.batch import RunningBatch
from service.engine.device import device_facts, is_device_broken, is_out_of_memory, nvidia_driver_version
from service.engine.model import OcrModel
from service.engine.page import PageTask
from service.engine.preprocess import preprocess
from service.engine.stats import StageTimer
from service.engine.weights.loading import ModelLoadError, load_model
from service.scheduler.memory import GPU_KV_SHARE, default_batch_tokens
from service.settings import ServiceSettings
from tests.helpers import GatedEngine, png_bytes, text_page
from tests.helpers import wait_until_ready as wait_ready

GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]


# --- 1. the KV budget on CUDA, with the vLLM decoder's freed layers ---------------------------------------


def test_the_cuda_kv_budget_needs_no_decoder_layer(preset_cache):
    """The vLLM decoder frees the layers; the budget must still be computable (it crashed the start-up)."""
    engine = OCREngine.load("tiny", device="cpu", cache_dir=preset_cache)
    engine.model.release_decoder_layers()
    budget = default_batch_tokens(engine, free_bytes=lambda device: 80 * GIB)
    assert budget == max(8192, int(80 * GIB * GPU_KV_SHARE / engine.model.kv_bytes_per_token()))


@pytest.mark.parametrize("preset", ["tiny", "tiny-v2"])
def test_kv_bytes_per_token_from_the_config_equal_what_a_forward_stores(preset_cache, preset):
    from transformers import DynamicCache

    engine = OCREngine.load(preset, device="cpu", cache_dir=preset_cache)
    model = engine.model
    cache = DynamicCache(config=model.text_config)
    with torch.inference_mode():
        model.decoder(inputs_embeds=model.embed(torch.zeros(1, 1, dtype=torch.long)), past_key_values=cache)
    measured = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert model.kv_bytes_per_token() == measured


def test_the_vllm_decoder_gets_no_kv_budget_of_ours(tiny_engine):
    """vLLM budgets its own cache; ours would only refuse pages it has room for."""
    on_vllm = OCREngine(tiny_engine.model, decoder=object())
    assert default_batch_tokens(on_vllm, free_bytes=lambda device: 80 * GIB) is None


# --- 2. the device, said loudly ---------------------------------------------------------------------------


def test_info_and_the_start_up_line_name_device_torch_build_dtype_and_implementations(tiny_engine, caplog):
    facts = device_facts(tiny_engine.device, torch.float32, tiny_engine.model.text_config)
    assert facts.device == "cpu" and facts.gpu is None and facts.torch == torch.__version__
    assert facts.attention == "sdpa" and facts.dtype == "float32"
    assert "torch " + torch.__version__ in facts.line() and "attention sdpa" in facts.line()
    app = create_app(ServiceSettings(model="tiny", warmup=False, log_json=False), load_engine=lambda: tiny_engine)
    with TestClient(app) as client:
        wait_ready(client)
        runtime = client.get("/v1/info").json()["runtime"]
    assert runtime == facts.as_dict()


def test_the_driver_version_is_read_from_the_kernel_module(tmp_path):
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build  (dvs)\n")
    assert nvidia_driver_version(proc) == "580.95.05"
    assert nvidia_driver_version(tmp_path / "absent") is None


def test_asking_for_cuda_without_it_fails_loudly_instead_of_running_on_the_cpu(preset_cache):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model("tiny", device="cuda", cache_dir=preset_cache)


# --- 4. sticky CUDA errors and other libraries' allocation failures ------------------------------------


@pytest.mark.parametrize(
    ("message", "oom", "broken"),
    [
        ("CUDA out of memory. Tried to allocate 2.00 GiB", True, False),
        ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True, False),
        ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True, False),
        ("CUDA error: an illegal memory access was encountered", False, True),
        ("CUDA error: device-side assert triggered", False, True),
        ("shape '[2, 3]' is invalid for input of size 7", False, False),
    ],
)
def test_device_failures_are_told_apart(message, oom, broken):
    exc = torch.AcceleratorError(message) if "CUDA error" in message else RuntimeError(message)
    assert (is_out_of_memory(exc), is_device_broken(exc)) == (oom, broken)


def test_a_sticky_cuda_error_turns_readyz_red_and_asks_the_process_to_exit(tiny_engine):
    gated = GatedEngine(tiny_engine)
    fatal: list[BaseException] = []
    settings = ServiceSettings(model="tiny", warmup=False, log_json=False, retry_after_s=3)
    app = create_app(settings, load_engine=lambda: gated, on_fatal=fatal.append)
    with TestClient(app) as client:
        wait_ready(client)
        gated.fail_next = torch.AcceleratorError("CUDA error: device-side assert triggered")
        page = png_bytes(text_page((400, 300), lines=4))
        answer = client.post("/v1/ocr", files={"file": ("p.png", page)}, data={"mode": "tiny"})
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "device_failed"
        assert answer.headers["retry-after"] == "3"
        deadline = time.monotonic() + 120  # liveness on a busy machine, not a speed claim
        while client.get("/readyz").status_code != 503:
            assert time.monotonic() < deadline, "/readyz stayed green on a broken device"
            time.sleep(0.02)
        assert "device-side assert" in client.get("/readyz").json()["error"]["message"]
    assert len(fatal) == 1


# --- 5. padded batches: one attention implementation, no NaN in pad rows --------------------------------


def test_an_attention_implementation_other_than_sdpa_is_refused(preset_cache):
    loaded = load_model("tiny", device="cpu", cache_dir=preset_cache)
    loaded.model.set_attn_implementation("eager")
    with pytest.raises(ModelLoadError, match="'eager' is not supported"):
        OcrModel(loaded)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_left_padded_prefill_keeps_pad_rows_and_the_cache_free_of_nan(preset_cache, dtype):
    engine = OCREngine.load("tiny", device="cpu", dtype=dtype, cache_dir=preset_cache)
    options = [OcrOptions(mode=mode, max_new_tokens=4) for mode in ("tiny", "base", "small")]  # 3 lengths
    pages = engine.prepare([PageTask(text_page(), o, StageTimer()) for o in options])
    batch = RunningBatch(engine.model)
    batch.join([page.sequence for page in pages])
    for layer in batch._cache.layers:
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
    batch.step()
    assert all(page.sequence.outcome is None or not isinstance(page.sequence.outcome, Exception) for page in pages)


# --- 6. an evicted page goes on from its tokens ----------------------------------------------------------


def test_an_evicted_page_prefills_its_prompt_and_tokens_and_never_generates_them_again(tiny_engine):
    options = OcrOptions(mode="base", pruner="rtprune", retention=0.7, max_new_tokens=12, ngram_size=0)
    alone = tiny_engine.run(text_page(), options)
    announced: list[int] = []
    task = PageTask(text_page(), options, StageTimer(), on_token=lambda position, token: announced.append(position))
    page = tiny_engine.prepare([task])[0]
    sequence = page.sequence
    batch = RunningBatch(tiny_engine.model)
    batch.join([sequence])
    for _ in range(4):
        batch.step()
    batch.remove([sequence])  # evicted after an out-of-memory, as the scheduler does
    produced = list(sequence.tokens)
    width = batch.prefill_inputs(sequence).length
    assert width == sequence.prompt.length + len(produced)
    batch.join([sequence])
    while batch.rows:
        batch.step()
    assert sequence.tokens[: len(produced)] == produced
    assert announced == list(range(len(sequence.tokens)))  # every position streamed once, in order
    assert tiny_engine.finish(page).text == alone.text  # fp32: the same text as alone (bf16 may differ)


# --- 7. memory peaks: the vision call is bounded, warm-up sees every mode, /metrics shows the GPU -----------


def count_encode_calls(engine, monkeypatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    original = engine.model.encode

    def counting(pages):
        calls.append((len(pages), pages[0].global_view.shape[-1]))
        return original(pages)

    monkeypatch.setattr(engine.model, "encode", counting)
    return calls


def test_a_vision_call_is_split_to_stay_within_its_memory_bound(tiny_engine, monkeypatch):
    calls = count_encode_calls(tiny_engine, monkeypatch)
    tasks = [PageTask(text_page(), OcrOptions(mode="base", max_new_tokens=1), StageTimer()) for _ in range(4)]
    one_page = tiny_engine.model.vision_bytes(preprocess(text_page(), "base"))
    together = tiny_engine.run_batch(tasks)
    monkeypatch.setattr(tiny_engine, "max_vision_bytes", 2 * one_page)
    split = tiny_engine.run_batch(tasks)
    assert [n for n, _ in calls] == [4, 2, 2]
    assert [r.text for r in together] == [r.text for r in split]


def test_the_vision_memory_estimate_grows_with_the_square_of_a_views_patches(tiny_engine):
    page = Image.new("RGB", (1280, 1280), "white")
    base, large = (tiny_engine.model.vision_bytes(preprocess(page, mode)) for mode in ("base", "large"))
    assert large / base == pytest.approx((80**2 / 64**2) ** 2)  # (1280/16)² vs (1024/16)² patches, squared


def test_warm_up_on_a_gpu_runs_every_mode_at_its_largest_view(tiny_engine, monkeypatch):
    calls = count_encode_calls(tiny_engine, monkeypatch)
    tiny_engine.warmup(every_mode=True)
    assert {side for _, side in calls} >= {512, 640, 1024, 1280}  # tiny, small, base/gundam, large


def test_metrics_export_gpu_memory(tiny_engine):
    app = create_app(ServiceSettings(model="tiny", warmup=False, log_json=False), load_engine=lambda: tiny_engine)
    with TestClient(app) as client:
        wait_ready(client)
        text = client.get("/metrics").text
    for kind in ("allocated", "reserved", "peak"):
        assert f'rtprune_gpu_memory_bytes{{kind="{kind}"}} 0.0' in text  # a CPU process holds none


# --- also: POT's backends and device, this process's share of the GPU ------------------------------------


def test_importing_the_pruner_imports_no_other_array_library(tmp_path):
    """GPU images carry JAX and CuPy; POT would import them (and their GPU runtimes) at its own import."""
    import subprocess
    import sys

    for name in ("jax", "cupy"):  # stand-ins that leave a mark when imported
        package = tmp_path / name
        package.mkdir()
        (package / "__init__.py").write_text(f"open({str(tmp_path / (name + '.imported'))!r}, 'w').close()\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", "import pruning"], check=True, env=env, timeout=120)
    assert not list(tmp_path.glob("*.imported"))


def prepare_emulated(count: int, device: str, fraction: float | None = None) -> dict:
    """``prepare_device`` in a fresh process whose ``torch._C`` reports ``count`` GPUs (tests/emulated_cuda.py)."""
    command = [sys.executable, "-m", "tests.emulated_cuda", str(count), device]
    if fraction is not None:
        command.append(str(fraction))
    env = {**os.environ}
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_bare_cuda_device_gets_the_current_index_before_the_first_allocation():
    """``--device cuda`` (every compose GPU service) must pass torch's own per-device checks: the index is
    resolved, the device set (POT allocates on a bare "cuda") and this process's share capped on it."""
    prepared = prepare_emulated(1, "cuda", 0.45)
    assert prepared == {"device": "cuda:0", "calls": [["init"], ["setDevice", 0], ["setMemoryFraction", 0.45, 0]]}


def test_an_indexed_cuda_device_is_kept_and_one_that_does_not_exist_is_refused():
    assert prepare_emulated(2, "cuda:1") == {"device": "cuda:1", "calls": [["setDevice", 1]]}
    refused = prepare_emulated(1, "cuda:1")
    assert refused["error"].startswith("ModelLoadError") and "sees 1 GPU(s), cuda:0 to cuda:0" in refused["error"]
    assert prepare_emulated(0, "cuda")["error"].endswith("CUDA is not available; use --device cpu")


def test_cuda_allocation_settings_are_made_before_the_first_allocation_and_a_users_own_win(monkeypatch):
    from service.engine import device as device_module

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert device_module.prepare_device(torch.device("cpu"), memory_fraction=0.45) == torch.device("cpu")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in device_module.os.environ  # nothing is set for the CPU
    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", lambda: 1, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_setDevice", lambda index: None, raising=False)
    device_module.prepare_device(torch.device("cuda:0"))
    assert device_module.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
    device_module.prepare_device(torch.device("cuda:0"))
    assert device_module.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "backend:cudaMallocAsync"
