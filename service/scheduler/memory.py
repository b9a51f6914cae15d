"""Memory for the scheduler: the KV budget a device gets, and handing freed memory back (device
caches after an OOM, host heap after a large document). What running out means for a request is
the error table's (:func:`service.errors.to_service_error`)."""

from __future__ import annotations

import contextlib
import ctypes

import torch

from service.engine import OCREngine

CPU_BATCH_TOKENS = 32_768  # default KV budget on CPU (~4 GB of fp32 KV on the full-size model)
GPU_KV_SHARE = 0.6  # share of the free device memory after warm-up given to the KV cache


def release_device_memory(exc: BaseException) -> None:
    """After an out-of-memory, give the allocator's cached blocks back before the retry."""
    if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
        torch.cuda.empty_cache()


def return_memory_to_os() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and RSS stays at its peak after a
    large document); elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def default_batch_tokens(engine: OCREngine) -> int:
    """A KV budget for the device: a share of the memory free after warm-up on CUDA, a fixed one on CPU."""
    device = engine.device
    if device.type != "cuda":
        return CPU_BATCH_TOKENS
    free, _ = torch.cuda.mem_get_info(device)
    return max(8192, int(free * GPU_KV_SHARE / engine.model.kv_bytes_per_token()))
