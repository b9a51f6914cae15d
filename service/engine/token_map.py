"""What the pruner did to the global view, in a form a browser can draw over the page.

Opt-in (``token_map=true``), so ordinary responses stay small. Per global-grid token, row
major: ``k`` kept, ``m`` pruned but merged into the kept tokens (RTPrune's stage 2), ``d``
pruned and dropped (baselines). ``content_box`` is where the page sits inside the square
global view (the rest is grey padding); ``preview`` is the page itself, downscaled, so PDFs
and EXIF-rotated photos are drawn exactly as the model saw them.
"""

from __future__ import annotations

import base64
import io

import torch
from PIL import Image
from pydantic import BaseModel, Field

from pruning import PruneResult

from .layout import PIXELS_PER_TOKEN
from .model import VisualBlock
from .preprocess import SQUASH_MAX, load_rgb

PREVIEW_MAX_SIDE = 1024


class TokenMap(BaseModel):
    grid: list[int] = Field(description="[rows, columns] of the global view's token grid")
    status: str = Field(description="one character per token, row major: k kept, m merged away, d dropped")
    view_size: int = Field(description="side of the square global view in pixels")
    content_box: list[int] = Field(description="[x0, y0, x1, y1] of the page inside the global view")
    page_size: list[int] = Field(description="[width, height] of the page as uploaded (after EXIF rotation)")


def content_box(page_size: tuple[int, int], view: int) -> list[int]:
    """Where ``ImageOps.pad`` puts the page in the square view (the same rounding as PIL); squashed
    small views are all page."""
    width, height = page_size
    if view <= SQUASH_MAX:
        return [0, 0, view, view]
    if width >= height:
        content_w, content_h = view, round(height / width * view)
    else:
        content_w, content_h = round(width / height * view), view
    x0, y0 = round((view - content_w) * 0.5), round((view - content_h) * 0.5)
    return [x0, y0, x0 + content_w, y0 + content_h]


def build_token_map(block: VisualBlock, pruned: PruneResult, merges: bool, version: str) -> TokenMap:
    view = block.global_view.shape[-1]
    q = view // PIXELS_PER_TOKEN
    row = q + (0 if version == "v2" else 1)  # v1 rows end with a newline token
    start = block.n_tokens - (q * row + 1)  # local tiles come first, the separator last
    grid = start + torch.arange(q)[:, None] * row + torch.arange(q)[None, :]  # (q, q) block indices
    kept = torch.zeros(block.n_tokens, dtype=torch.bool)
    kept[pruned.kept_indices.cpu()] = True
    gone = "m" if merges else "d"
    status = "".join("k" if k else gone for k in kept[grid.flatten()].tolist())
    return TokenMap(
        grid=[q, q],
        status=status,
        view_size=view,
        content_box=content_box(block.page.size, view),
        page_size=list(block.page.size),
    )


def preview_data_url(image: Image.Image, max_side: int = PREVIEW_MAX_SIDE) -> str:
    """The page as a small JPEG data URL, oriented as the model saw it."""
    page = load_rgb(image)
    page.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    page.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
