"""Memory for the scheduler: the KV budget a device gets, what a failed model call leaves to clean up
(cached device blocks after an out-of-memory; a lost device ends the process), and handing freed host
memory back after a large document. What a failure means for a request is the error table's
(:func:`service.failures.to_service_error`)."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable

import torch

from service.engine import OCREngine
from service.engine.device import DeviceLost, is_device_broken, is_out_of_memory

CPU_BATCH_TOKENS = 32_768  # default KV budget on CPU (~4 GB of fp32 KV on the full-size model)
GPU_KV_SHARE = 0.6  # share of the free device memory after warm-up given to the KV cache
MIN_GPU_BATCH_TOKENS = 8192


def after_failed_call(exc: BaseException) -> None:
    """After a model call raised: give the allocator's cached blocks back after an out-of-memory (of any
    library), so the retry with fewer pages has them; raise DeviceLost if the device is unusable now."""
    if is_device_broken(exc):
        raise DeviceLost(f"the device failed and cannot be used again by this process: {exc}") from exc
    if is_out_of_memory(exc) and torch.cuda.is_available():
        torch.cuda.empty_cache()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
LARGE_ALLOCATION = 1 << 20


def map_large_allocations() -> None:
    """Serve every allocation of 1 MB or more from its own mapping, returned to the OS when freed.

    glibc raises its mmap threshold as large blocks are freed (up to 32 MB), after which image buffers
    (Pillow allocates them in 16 MB blocks) come from per-thread heaps that keep their pages: resident
    memory then grows with the number of threads that ever decoded an image, i.e. with traffic. A fixed
    threshold keeps memory bounded by what is in use. Linux/glibc only; elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION)
        libc.mallopt(M_TRIM_THRESHOLD, 4 * LARGE_ALLOCATION)


def return_memory_to_os() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and RSS stays at its peak after a
    large document); elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def cuda_free_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return free


def default_batch_tokens(engine: OCREngine, free_bytes: Callable[[torch.device], int] | None = None) -> int | None:
    """A KV budget for the device, measured after warm-up (which has seen the vision encoder's peak): a
    share of the free GPU memory over the KV bytes a token takes (from the config, so it also works once
    the vLLM decoder freed the layers), a fixed one on CPU; None on the vLLM decoder, which budgets its
    own cache. ``free_bytes`` answers how much device memory is free (injected by tests)."""
    if engine.decoder is not None:
        return None
    if free_bytes is None:
        if engine.device.type != "cuda":
            return CPU_BATCH_TOKENS
        free_bytes = cuda_free_bytes
    budget = int(free_bytes(engine.device) * GPU_KV_SHARE / engine.model.kv_bytes_per_token())
    return max(MIN_GPU_BATCH_TOKENS, budget)
