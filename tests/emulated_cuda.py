"""CUDA devices that exist only in PyTorch's lowest layer, for the device code's tests.

Run as a script (a fresh process: the patches touch torch's private state, which must not leak into
other tests): ``python -m tests.emulated_cuda COUNT DEVICE [FRACTION]`` patches ``torch._C``'s device
count to COUNT, calls the service's own :func:`prepare_device` on DEVICE, and prints one JSON line: the
device it returned and the ``torch._C`` calls it made, or the error it raised. Every public
``torch.cuda`` function (``is_available``, ``current_device``, ``set_device``,
``set_per_process_memory_fraction``) runs as shipped, with its own argument checks.

On a CUDA build of torch only the count is patched: the rest is the real runtime, which then fails
for want of a driver. On a CPU build the runtime calls are missing and are recorded instead.
"""

from __future__ import annotations

import json
import sys

import torch


def emulate(count: int) -> list[list]:
    """Make ``torch._C`` report ``count`` GPUs; on a CPU build, record the runtime calls it would make."""
    calls: list[list] = []
    cuda_build = hasattr(torch._C, "_cuda_getDeviceCount")
    torch._C._cuda_getDeviceCount = lambda: count
    if not cuda_build:
        current = [0]

        def set_device(index: int) -> None:
            calls.append(["setDevice", index])
            current[0] = index

        torch._C._cuda_init = lambda: calls.append(["init"])
        torch._C._cuda_getDevice = lambda: current[0]
        torch._C._cuda_setDevice = set_device
        torch._C._cuda_setMemoryFraction = lambda fraction, index: calls.append(["setMemoryFraction", fraction, index])
        torch.cuda._cudart = object()  # the CPU build has no runtime module; _lazy_init checks it is there
    return calls


def main() -> None:
    count, device = int(sys.argv[1]), sys.argv[2]
    fraction = float(sys.argv[3]) if len(sys.argv) > 3 else None
    calls = emulate(count)

    from service.engine.device import prepare_device
    from service.engine.weights.loading import resolve_device

    try:
        prepared = prepare_device(resolve_device(device), memory_fraction=fraction)
        print(json.dumps({"device": str(prepared), "calls": calls}))
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "calls": calls}))


if __name__ == "__main__":
    main()
