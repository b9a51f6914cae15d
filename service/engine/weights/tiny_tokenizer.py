"""A small byte-level BPE tokenizer that keeps DeepSeek-OCR's real special-token ids.

The real ``tokenizer.json`` (DeepSeek-V3's layout) cannot be downloaded here, and the
random-weight presets need a tokenizer anyway. This one is deterministic and has the
same id layout: bos/eos/pad at 0/1/2, the 256 byte symbols and a few hundred merges
next, filler tokens up to 127,999 so every id decodes, then the real added tokens
128000-128826 (``<image>`` 128815, grounding 128816-128820, ``<td>``/``</td>``
128821/128822, ...) copied from the shipped ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

FIRST_ADDED_ID = 128_000

_CORPUS = [
    "Convert the document to markdown.",
    "OCR this image. Free OCR. Parse the figure. Describe this image in detail.",
    "Locate the title in the image.",
    "The quick brown fox jumps over the lazy dog; 0123456789 and (a + b) = c.",
    "# Heading\n\nA paragraph of text with a table: | col | value |\n",
    "Introduction Results Methods Conclusion Table Figure Abstract References",
]


def _added_tokens(tokenizer_config: dict) -> list[tuple[int, dict]]:
    decoder = tokenizer_config["added_tokens_decoder"]
    return sorted((int(i), spec) for i, spec in decoder.items())


def build_tokenizer(tokenizer_config: dict) -> Tokenizer:
    """Build the tokenizer from the real ``tokenizer_config.json`` contents."""
    added = _added_tokens(tokenizer_config)
    leading = [spec["content"] for i, spec in added if i < FIRST_ADDED_ID]  # bos, eos, pad at 0..2
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=leading,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)

    state = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    filler = len(vocab)
    while len(vocab) < FIRST_ADDED_ID:  # plain ASCII names decode to themselves
        name = f"<fill_{filler}>"
        if name not in vocab:
            vocab[name] = len(vocab)
        filler += 1
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]
    full = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    full.pre_tokenizer = tokenizer.pre_tokenizer
    full.decoder = tokenizer.decoder

    for token_id, spec in added:
        token = AddedToken(
            spec["content"],
            single_word=spec["single_word"],
            lstrip=spec["lstrip"],
            rstrip=spec["rstrip"],
            normalized=spec["normalized"],
            special=spec["special"],
        )
        if token_id < FIRST_ADDED_ID:
            full.add_special_tokens([token])  # already in the vocab: marks them special
            continue
        got = full.add_special_tokens([token]) if spec["special"] else full.add_tokens([token])
        assert got == 1 and full.token_to_id(spec["content"]) == token_id, f"id drift at {token_id}"
    return full


def write_tokenizer_files(reference_dir: Path, out_dir: Path) -> None:
    """Write tokenizer.json beside copies of the real tokenizer and special-token configs."""
    tokenizer_config = json.loads((reference_dir / "tokenizer_config.json").read_text())
    build_tokenizer(tokenizer_config).save(str(out_dir / "tokenizer.json"))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (out_dir / name).write_text((reference_dir / name).read_text())
