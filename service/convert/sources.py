"""What to convert: files, folders (recursively) and globs of PDFs and images, and where each goes."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = frozenset({".pdf", ".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"})


@dataclass(frozen=True)
class Source:
    """One document: where it is, and its name under the output folder (no suffix: ``name.md``, ``name.json``)."""

    path: Path
    name: str


def find_sources(inputs: list[str]) -> tuple[list[Source], list[tuple[str, str]]]:
    """The documents the inputs name, in a stable order, and (input, why) for each input that names none.

    A folder contributes every PDF and image below it, named by its path inside the folder (the
    structure is mirrored under ``--out``); a file or a glob match is named by its file name. Two
    documents that would share a name (``a.pdf`` and ``a.png``) keep their suffix in it."""
    found: list[tuple[Path, Path]] = []  # (file, its path relative to what named it)
    problems: list[tuple[str, str]] = []
    for given in inputs:
        path = Path(given).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            found += [(p, p.relative_to(path)) for p in files]
            if not files:
                problems.append((given, "no PDF or image in this folder"))
        elif path.is_file():
            found.append((path, Path(path.name)))
        elif matches := sorted(glob.glob(given, recursive=True)):
            files = [Path(m) for m in matches if Path(m).is_file() and Path(m).suffix.lower() in SUFFIXES]
            found += [(p, Path(p.name)) for p in files]
            if not files:
                problems.append((given, "matches no PDF or image"))
        else:
            problems.append((given, "no such file, folder or match"))
    return _named(found), problems


def _named(found: list[tuple[Path, Path]]) -> list[Source]:
    seen: set[Path] = set()
    unique = [(p, rel) for p, rel in found if not (p.resolve() in seen or seen.add(p.resolve()))]
    stems: dict[str, int] = {}
    for _, rel in unique:
        stems[str(rel.with_suffix(""))] = stems.get(str(rel.with_suffix("")), 0) + 1
    return [
        Source(path, str(rel.with_suffix("")) if stems[str(rel.with_suffix(""))] == 1 else str(rel))
        for path, rel in unique
    ]
