"""What the engine runs on, and what a failure of that device means.

- :func:`prepare_device`: settings that must precede the first CUDA allocation (the allocator's
  expandable segments, this process's share of the GPU, the current device for libraries that
  say a bare ``"cuda"``, such as POT's torch backend).
- :func:`device_facts`: device, GPU, torch and its CUDA build, driver, dtype and the attention and
  experts implementations, for the start-up log line and ``/v1/info``: a missing GPU or a wrong
  wheel is visible at a glance, never a silent CPU fallback.
- :func:`is_out_of_memory` and :func:`is_device_broken`: an allocation failure of any library is
  out of memory (retry with fewer pages); a sticky CUDA error (device-side assert, illegal address)
  leaves the context unusable, so the process must be restarted rather than fail every request.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Allocation failures that are not torch.OutOfMemoryError: cuBLAS/cuDNN workspaces, NCCL, the driver.
OOM_MARKERS = (
    "out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "cudaErrorMemoryAllocation",
    "CUDA_ERROR_OUT_OF_MEMORY",
)
# Errors after which every later CUDA call in the process fails (the context is lost).
STICKY_MARKERS = (
    "device-side assert",
    "illegal memory access",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "uncorrectable ECC error",
    "CUDA error: launch failure",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "cudaErrorLaunchFailure",
)


class DeviceLost(RuntimeError):
    """The device failed in a way no retry can mend (a sticky CUDA error): the process must restart."""


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's own out-of-memory error, or another library's allocation failure on the device."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in OOM_MARKERS)


def is_device_broken(exc: BaseException) -> bool:
    """A device error that poisons the CUDA context: nothing in this process can use the GPU again."""
    if is_out_of_memory(exc) or not isinstance(exc, RuntimeError):
        return False
    return any(marker in str(exc) for marker in STICKY_MARKERS)


def on_device(values: list, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on ``device``: through pinned memory and without waiting, on a GPU."""
    tensor = torch.tensor(values)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def prepare_device(device: torch.device, *, memory_fraction: float | None = None) -> torch.device:
    """Settings for a CUDA device, before the model's first allocation; the device itself, with its index.

    A bare ``"cuda"`` (what compose files and ``--device cuda`` say) names the current device; torch's
    per-device calls (``set_device``, the memory fraction, ``mem_get_info``) refuse a device without an
    index, so the index is resolved here once and everything after uses the device returned.
    Expandable segments let the KV cache grow without fragmenting the allocator's blocks (a
    setting the user made wins). ``memory_fraction`` caps this process's share of the GPU, for a
    GPU shared with a vLLM server that budgets the rest. Nothing happens off CUDA."""
    if device.type != "cuda":
        return device
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    indexed = with_index(device)
    torch.cuda.set_device(indexed.index)  # libraries that allocate on a bare "cuda" (POT) now use this device
    if memory_fraction is not None:
        torch.cuda.set_per_process_memory_fraction(memory_fraction, indexed.index)
    return indexed


def with_index(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:N`` for the current device N; a device that has an index, or none to have, as it is."""
    if device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", torch.cuda.current_device())


@dataclass(frozen=True)
class DeviceFacts:
    device: str
    gpu: str | None
    compute_capability: str | None
    torch: str
    torch_cuda: str | None  # the CUDA version the torch wheel was built for (None: a CPU build)
    driver: str | None
    dtype: str
    attention: str | None
    experts: str | None

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)

    def line(self) -> str:
        """One log line: what a person checks first when a GPU deployment is slow."""
        gpu = f"{self.gpu} (sm {self.compute_capability}), driver {self.driver}" if self.gpu else "no GPU"
        return (
            f"device {self.device}: {gpu}; torch {self.torch} (CUDA build {self.torch_cuda or 'none'}); "
            f"dtype {self.dtype}; attention {self.attention}; experts {self.experts}"
        )


def device_facts(device: torch.device, dtype: torch.dtype, text_config) -> DeviceFacts:
    gpu = capability = driver = None
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        gpu, capability = properties.name, f"{properties.major}.{properties.minor}"
        driver = nvidia_driver_version()
    return DeviceFacts(
        device=str(device),
        gpu=gpu,
        compute_capability=capability,
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        driver=driver,
        dtype=str(dtype).removeprefix("torch."),
        attention=getattr(text_config, "_attn_implementation", None),
        experts=getattr(text_config, "_experts_implementation", None),
    )


def nvidia_driver_version(proc: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    """The kernel driver's version (e.g. 580.95.05), which decides which CUDA builds can run."""
    try:
        text = proc.read_text()
    except OSError:
        return None
    for word in text.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(part.isdigit() for part in parts):
            return word
    return None


def memory_bytes(device: torch.device) -> dict[str, int]:
    """The caching allocator's view of a GPU: allocated, reserved (allocated plus cached blocks) and the
    peak allocated since start; zeros off a GPU."""
    if device.type != "cuda":
        return {"allocated": 0, "reserved": 0, "peak": 0}
    return {
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
        "peak": torch.cuda.max_memory_allocated(device),
    }
