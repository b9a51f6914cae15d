"""Decoding: one page's generation state (``sequence``), the contract a decoding batch keeps
(``contract``), its two implementations — this process's ``batch`` and the ``vllm_decoder`` client —
and ``generate``, the driver that runs a static batch to its end (CLI, evaluation, benchmarks)."""
