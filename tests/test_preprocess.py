"""Preprocessing and token layout match DeepSeek-OCR v1 exactly."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from service.engine.layout import block_masks, visual_token_count
from service.engine.preprocess import candidate_grids, choose_tile_grid, global_view, preprocess


@pytest.mark.parametrize(
    "mode,size,expected",
    [
        ("tiny", (600, 800), 73),
        ("small", (600, 800), 111),
        ("base", (1100, 800), 273),
        ("large", (1100, 800), 421),
        ("gundam", (1100, 800), 273 + 20 * 31),  # 3x2 tiles: 893
        ("gundam", (600, 800), 273 + 30 * 21),  # 2x3 tiles: 903
        ("gundam", (400, 300), 273),  # both sides <= 640: no tiles
        ("gundam", (640, 640), 273),
    ],
)
def test_visual_block_sizes(mode, size, expected):
    page = preprocess(Image.new("RGB", size), mode)
    assert visual_token_count(page) == expected
    protected, newline = block_masks(page)
    assert protected.numel() == expected
    assert protected[-1] and not newline[-1]  # the separator


@pytest.mark.parametrize("cols,rows", [(1, 6), (6, 1), (2, 3), (3, 2), (1, 9), (3, 3)])
def test_gundam_formula(cols, rows):
    page = preprocess(Image.new("RGB", (cols * 700, rows * 700)), "gundam", max_crops=9)
    assert page.grid == (cols, rows)
    assert visual_token_count(page) == 273 + (10 * rows) * (10 * cols + 1)
    assert page.tiles.shape == (cols * rows, 3, 640, 640)


def test_tile_grid_choice_matches_v1_rules():
    assert choose_tile_grid(1100, 800, 640, 6) == (3, 2)
    assert choose_tile_grid(600, 800, 640, 6) == (2, 3)
    # ties go to the larger grid only when the page has more than half its pixels
    assert choose_tile_grid(1000, 1000, 640, 6) == (2, 2)
    assert all(2 <= c * r <= 6 for c, r in candidate_grids(2, 6))
    assert (1, 1) not in candidate_grids(2, 9)


def test_tiles_are_row_major():
    image = Image.new("RGB", (1280, 640), "white")
    image.paste((0, 0, 0), (640, 0, 1280, 640))  # right half black
    page = preprocess(image, "gundam")
    assert page.grid == (2, 1)
    assert page.tiles[0].mean() > 0.9 and page.tiles[1].mean() < -0.9


def test_pad_centres_with_python_rounding():
    # 1100x800 -> content 1024x745, 279 rows of padding: v1 puts round(139.5) = 140 on top
    view = global_view(Image.new("RGB", (1100, 800), "white"), 1024)
    column = torch.from_numpy(np.array(view))[:, 512, 0]
    assert (column[:140] == 127).all() and column[140] == 255 and column[140 + 744] == 255
    assert column[140 + 745] == 127


def test_small_modes_squash_instead_of_padding():
    view = global_view(Image.new("RGB", (300, 900), "white"), 640)
    assert view.size == (640, 640) and (np.asarray(view) == 255).all()


def test_pixels_are_normalised_to_minus_one_one():
    page = preprocess(Image.new("RGB", (512, 512), (255, 0, 127)), "tiny")
    assert page.global_view.shape == (3, 512, 512)
    torch.testing.assert_close(page.global_view[:, 0, 0], torch.tensor([1.0, -1.0, 127 / 255 * 2 - 1]))


def test_exif_orientation_is_honoured():
    image = Image.new("RGB", (800, 400), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    page = preprocess(Image.open(buffer), "gundam")
    assert page.size == (400, 800)
    assert page.grid == (1, 2)  # portrait after rotation


def test_mode_errors_are_clear():
    with pytest.raises(ValueError, match="tiny"):
        preprocess(Image.new("RGB", (10, 10)), "huge")
    with pytest.raises(ValueError, match="max_crops"):
        preprocess(Image.new("RGB", (10, 10)), "gundam", max_crops=12)


def test_pixels_normalised_on_the_device_equal_the_host_normalisation():
    """The service hands uint8 views from its preprocessing threads and normalises them where the model is:
    the numbers must be the ones the host normalisation gives."""
    from service.engine.preprocess import normalise

    image = Image.effect_noise((1500, 1100), 80).convert("RGB")
    host = preprocess(image, "gundam")
    pixels = preprocess(image, "gundam", normalised=False)
    assert pixels.global_view.dtype == torch.uint8 and pixels.tiles.dtype == torch.uint8
    assert torch.equal(normalise(pixels.global_view, torch.device("cpu")), host.global_view)
    assert torch.equal(normalise(pixels.tiles, torch.device("cpu")), host.tiles)
