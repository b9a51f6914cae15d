"""The output folder of a conversion, which is also its memory between runs.

Each finished page is written at once, atomically, under ``.rtprune-convert/pages/<document>/``, and
never again: a run that is killed loses only the pages in flight, and the next run does only what
is missing. ``.rtprune-convert/manifest.json`` records each document's options (a key over the
resolved options and the model): a document converted with other options is redone. A finished
document is ``<name>.md`` (its pages joined as the API joins them) and ``<name>.json`` (pages with
text, boxes and statistics, totals, warnings) beside the folder structure of the inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from .sources import Source

STATE = ".rtprune-convert"
PAGE_FIELDS_LEFT_OUT = {"token_map", "preview"}  # the try-out page's opt-in fields


def options_key(model: str, options: dict[str, Any]) -> str:
    """What a document's result depends on: the model and every resolved page option."""
    return hashlib.sha256(json.dumps({"model": model, "options": options}, sort_keys=True).encode()).hexdigest()[:16]


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


class Workspace:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.state = out / STATE
        self.manifest_path = self.state / "manifest.json"
        self.documents: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        if self.manifest_path.exists():
            self.documents = json.loads(self.manifest_path.read_text())["documents"]

    def _record(self, name: str, **entry: Any) -> None:
        """Update a document's manifest entry and save the manifest (documents of a --url run finish on
        several threads: one at a time)."""
        with self._lock:
            self.documents[name] = {**self.documents.get(name, {}), **entry}
            manifest = json.dumps({"version": 1, "documents": self.documents}, indent=1)
            write_atomically(self.manifest_path, manifest)

    def _pages_dir(self, source: Source) -> Path:
        return self.state / "pages" / source.name

    def is_done(self, source: Source, key: str) -> bool:
        entry = self.documents.get(source.name, {})
        outputs = (self.out / f"{source.name}.md", self.out / f"{source.name}.json")
        return entry.get("state") == "done" and entry.get("key") == key and all(p.exists() for p in outputs)

    def begin(self, source: Source, key: str, *, force: bool = False) -> dict[int, dict[str, Any]]:
        """Start (or resume) a document: the pages already finished with these options, by page number.
        Other options, or ``force``, discard them."""
        entry = self.documents.get(source.name)
        if force or entry is None or entry.get("key") != key:
            shutil.rmtree(self._pages_dir(source), ignore_errors=True)
        self._record(source.name, source=str(source.path), key=key, state="partial", error=None)
        finished = {}
        for path in sorted(self._pages_dir(source).glob("*.json")):
            finished[int(path.stem)] = json.loads(path.read_text())
        return finished

    def page_done(self, source: Source, number: int, result) -> dict[str, Any]:
        """Write a finished page (a ``PageResult``) once; its record as stored."""
        record = result.model_dump(mode="json", exclude=PAGE_FIELDS_LEFT_OUT)
        path = self._pages_dir(source) / f"{number:05d}.json"
        if not path.exists():  # a page is written once
            write_atomically(path, json.dumps(record, ensure_ascii=False))
        return record

    def finish(self, source: Source, pages: dict[int, dict[str, Any]], meta: dict[str, Any], seconds: float) -> dict:
        """Write the document's ``.md`` and ``.json`` from its pages; the manifest marks it done."""
        # imported here: a rerun with nothing to do never imports torch
        from service.schemas import PAGE_SEPARATOR, PageOut, aggregate

        out_pages = [PageOut(page=n, **pages[n]) for n in sorted(pages)]
        markdown = PAGE_SEPARATOR.join(p.markdown for p in out_pages)
        stats = aggregate(out_pages, seconds * 1e3)  # a PageOut is a PageResult with its number
        document = {
            "source": str(source.path),
            **meta,
            "markdown": markdown,
            "pages": [p.model_dump(mode="json", exclude=PAGE_FIELDS_LEFT_OUT) for p in out_pages],
            "stats": stats.model_dump(mode="json"),
        }
        write_atomically(self.out / f"{source.name}.json", json.dumps(document, indent=1, ensure_ascii=False))
        write_atomically(self.out / f"{source.name}.md", markdown + "\n")
        self._record(source.name, state="done")
        return stats.model_dump(mode="json")

    def fail(self, source: Source, reason: str) -> None:
        self._record(source.name, source=str(source.path), state="failed", error=reason)

    def write_report(self, report: dict[str, Any]) -> Path:
        path = self.out / "report.json"
        write_atomically(path, json.dumps(report, indent=1, ensure_ascii=False))
        return path
