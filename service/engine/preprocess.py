"""Image -> global view (+ tiles), exactly as DeepSeek-OCR prepares its input.

Pure functions of a PIL image and a mode; no model. v1 rules (``infer()`` of the remote
code): sizes <= 640 are squashed to a square, larger ones are fitted and padded with grey
127 centred by ``ImageOps.pad`` (Python rounding, so a 1-px shift differs from the floor
that transformers' processors use; we keep v1's). Gundam adds 640-px tiles when a side
exceeds 640, on the grid whose aspect ratio is closest to the page's. v2 (DeepSeek-OCR-2)
uses 768-px tiles and always a 1024 global view. Pixels are normalised to [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from .names import MODES_BY_VERSION, Mode

PAD_COLOR = (127, 127, 127)  # int(0.5 * 255), the normalisation mean
SQUASH_MAX = 640  # v1 squashes (no aspect ratio kept) at or below this size
MIN_CROPS = 2


@dataclass(frozen=True)
class ModeSpec:
    base_size: int  # global view side
    tile_size: int  # local tile side (crop modes)
    crop: bool


V1_MODES = {
    Mode.tiny: ModeSpec(512, 512, False),
    Mode.small: ModeSpec(640, 640, False),
    Mode.base: ModeSpec(1024, 1024, False),
    Mode.large: ModeSpec(1280, 1280, False),
    Mode.gundam: ModeSpec(1024, 640, True),
}
# DeepSeek-OCR-2: 1024 global + 768 tiles; without tiles one 768 view (transformers' crop_to_patches=False)
V2_MODES = {
    Mode.small: ModeSpec(768, 768, False),
    Mode.gundam: ModeSpec(1024, 768, True),
}
assert tuple(V1_MODES) == MODES_BY_VERSION["v1"] and tuple(V2_MODES) == MODES_BY_VERSION["v2"]


@dataclass(frozen=True)
class PreparedImage:
    """What the vision encoder consumes for one page.

    ``global_view`` (3, S, S) and ``tiles`` (n, 3, T, T) are float32 in [-1, 1] (or their uint8
    pixels, see :func:`preprocess`);
    ``grid`` is (columns, rows) of tiles, None without tiles; ``size`` is the original
    (width, height), for mapping boxes back to pixels.
    """

    global_view: torch.Tensor
    tiles: torch.Tensor | None
    grid: tuple[int, int] | None
    size: tuple[int, int]
    mode: Mode

    @property
    def num_tiles(self) -> int:
        return 0 if self.tiles is None else self.tiles.shape[0]


def load_rgb(image: Image.Image) -> Image.Image:
    """Honour EXIF orientation and drop alpha/palette, as v1 does on open."""
    return ImageOps.exif_transpose(image).convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 HWC -> float32 CHW normalised with mean = std = 0.5, i.e. into [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy((array - 0.5) / 0.5).permute(2, 0, 1).contiguous()  # (3, H, W)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """uint8 HWC -> uint8 CHW, not normalised: a quarter of the bytes to hand over and copy to the device."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, H, W)


def normalise(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 CHW (on any device) -> float32 in [-1, 1] on ``device``, the arithmetic of :func:`to_tensor`
    (so the numbers are the same), done where the pixels are going."""
    return pixels.to(device, non_blocking=True).float().div(255.0).sub(0.5).div(0.5)


def global_view(image: Image.Image, size: int) -> Image.Image:
    """v1's global view: squash when size <= 640, else aspect-preserving pad with grey 127."""
    if size <= SQUASH_MAX:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return ImageOps.pad(image, (size, size), method=Image.Resampling.BICUBIC, color=PAD_COLOR)


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """(columns, rows) grids with min_num <= columns * rows <= max_num, ordered as v1 orders them."""
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def choose_tile_grid(width: int, height: int, tile_size: int, max_crops: int) -> tuple[int, int]:
    """v1's ``find_closest_aspect_ratio``: the grid nearest the page's aspect ratio.

    On an exact tie the later (larger) grid wins if the page has more than half its pixels.
    """
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(MIN_CROPS, max_crops):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def cut_tiles(image: Image.Image, grid: tuple[int, int], tile_size: int) -> list[Image.Image]:
    """Resize to the grid (aspect ratio not kept, as v1 does) and cut row-major tiles."""
    cols, rows = grid
    resized = image.resize((cols * tile_size, rows * tile_size), Image.Resampling.BICUBIC)
    return [
        resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]


def preprocess(
    image: Image.Image, mode: Mode | str, *, version: str = "v1", max_crops: int = 6, normalised: bool = True
) -> PreparedImage:
    """Prepare one page for the vision encoder.

    Parameters
    ----------
    image : PIL image of any mode; EXIF orientation is applied.
    mode : one of :class:`Mode`. DeepSeek-OCR-2 supports ``small`` (768, no tiles) and ``gundam``.
    version : "v1" (DeepSeek-OCR) or "v2" (DeepSeek-OCR-2).
    max_crops : most tiles in Gundam mode (v1's vLLM scripts use 6, its HF ``infer()`` 9).
    normalised : float32 in [-1, 1] (default), or the uint8 pixels, to be normalised on the device by
        :func:`normalise` (what the service hands from its preprocessing threads to the model).
    """
    modes = V1_MODES if version == "v1" else V2_MODES
    if mode not in {m.value for m in modes}:
        raise ValueError(
            f"mode {mode!r} is not available for DeepSeek-OCR {version}; choose one of "
            f"{', '.join(m.value for m in modes)}"
        )
    if not MIN_CROPS <= max_crops <= 9:
        raise ValueError(f"max_crops must be between {MIN_CROPS} and 9, got {max_crops}")
    mode = Mode(mode)
    spec = modes[mode]
    convert = to_tensor if normalised else to_pixels
    image = load_rgb(image)
    width, height = image.size
    tiles, grid = None, None
    if spec.crop and max(width, height) > spec.tile_size:
        grid = choose_tile_grid(width, height, spec.tile_size, max_crops)
        tiles = torch.stack([convert(tile) for tile in cut_tiles(image, grid, spec.tile_size)])
    return PreparedImage(convert(global_view(image, spec.base_size)), tiles, grid, (width, height), mode)
