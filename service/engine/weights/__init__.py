"""Weight loading: a hub id, a local checkpoint or a random preset in, a loaded DeepSeek-OCR out.

``loading`` resolves the name and reads the real config and safetensors; ``presets`` builds the
random-weight checkpoints of the real architecture (``tiny``, ``tiny-v2``, ``random-full``) that
tests and benchmarks use; ``config_v1`` translates v1's original config; ``checkpoint_v1/`` holds
that config and tokenizer files. No request's walk enters this room: it runs once, at start-up.
"""
