"""Visual-token arithmetic: how many tokens a page becomes and which of them are protected.

One pure function per question, shared by the prompt builder (how many ``<image>``
placeholders), the pruner call (which tokens are newlines or the separator) and the
statistics. The layout is the one ``get_image_features`` produces:

- v1: local tiles stitched into one grid of (rows*q_t) rows x (cols*q_t + 1) tokens, the
  last of each row a newline; then the global q x (q + 1) grid, the same way; then one
  view separator. Tiny 73, Small 111, Base 273, Large 421, Gundam 273 + (10h)(10w + 1).
- v2: tiles' query tokens, the global view's, then the separator; no newlines.
"""

from __future__ import annotations

import torch

from .preprocess import PreparedImage

PIXELS_PER_TOKEN = 64  # 16-px SAM patches, then two stride-2 convolutions


def _grid_side(pixels: int) -> int:
    return pixels // PIXELS_PER_TOKEN


def block_masks(page: PreparedImage, version: str = "v1") -> tuple[torch.Tensor, torch.Tensor]:
    """(protected, newline) bool masks over the visual block of ``page``."""
    q = _grid_side(page.global_view.shape[-1])
    parts: list[torch.Tensor] = []
    if page.tiles is not None:
        cols, rows = page.grid
        q_tile = _grid_side(page.tiles.shape[-1])
        parts.append(_grid_newlines(rows * q_tile, cols * q_tile, version))
    parts.append(_grid_newlines(q, q, version))
    newline = torch.cat([*parts, torch.zeros(1, dtype=torch.bool)])  # separator last
    protected = newline.clone()
    protected[-1] = True
    return protected, newline


def _grid_newlines(rows: int, cols: int, version: str) -> torch.Tensor:
    if version == "v2":
        return torch.zeros(rows * cols, dtype=torch.bool)
    grid = torch.zeros(rows, cols + 1, dtype=torch.bool)
    grid[:, -1] = True
    return grid.flatten()


def visual_token_count(page: PreparedImage, version: str = "v1") -> int:
    """Tokens of the whole visual block, newlines and separator included."""
    q_tile = _grid_side(page.tiles.shape[-1]) if page.tiles is not None else 0
    return _block_size(_grid_side(page.global_view.shape[-1]), page.grid, q_tile, version)


def _block_size(q: int, grid: tuple[int, int] | None, q_tile: int, version: str) -> int:
    extra = 0 if version == "v2" else 1  # the newline column
    total = q * (q + extra) + 1  # global view, then the separator
    if grid is not None:
        cols, rows = grid
        total += (rows * q_tile) * (cols * q_tile + extra)
    return total
