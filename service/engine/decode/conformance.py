"""The decoders' half of the decode contract, checked statically: the type checker (mypy, run by the test
command over this package) proves each batch implements :class:`~.contract.DecodeBatch` (and the chunked
prefill where it claims to), so a method renamed or a signature changed on one side fails the build, not a
GPU run. Nothing here runs."""

from __future__ import annotations

from .batch import RunningBatch
from .contract import DecodeBatch, PrefillsInChunks
from .vllm_decoder import VllmBatch


def running_batch_decodes(batch: RunningBatch) -> DecodeBatch:
    return batch


def running_batch_prefills_in_chunks(batch: RunningBatch) -> PrefillsInChunks:
    return batch


def vllm_batch_decodes(batch: VllmBatch) -> DecodeBatch:
    return batch
