"""Write the sample documents the load test sends (small, generated, committed to the repo).

python docker/make_samples.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pages import document_page

SAMPLES = Path(__file__).parent / "samples"


def main() -> None:
    SAMPLES.mkdir(exist_ok=True)
    document_page((850, 1100), seed=1).save(SAMPLES / "letter-page.png", optimize=True)
    document_page((1100, 800), seed=2).convert("L").save(SAMPLES / "landscape-page.jpg", quality=70)
    document_page((480, 360), seed=3).save(SAMPLES / "small-snippet.webp", quality=70)
    pages = [document_page((612, 792), seed=s).convert("L") for s in (4, 5)]
    pages[0].save(SAMPLES / "two-pages.pdf", save_all=True, append_images=pages[1:], resolution=72)
    for path in sorted(SAMPLES.iterdir()):
        print(f"{path.name}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
