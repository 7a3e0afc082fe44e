"""Contact sheets: grids of model-input images with their labels and predictions, as PNG.

Training draws the fixed validation samples after each epoch
(``runs/<ID>/samples/epoch_NNN.png``); evaluation draws the misread images.
Only Pillow and NumPy are used, so drawing works wherever prediction does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

Colour = tuple[int, int, int]
BLACK: Colour = (0, 0, 0)
GREY: Colour = (110, 110, 110)
GREEN: Colour = (0, 120, 0)
RED: Colour = (200, 0, 0)
BACKGROUND: Colour = (255, 255, 255)

FONT_SIZE = 13
PADDING = 6
MIN_TILE_WIDTH = 150  # room for a caption under narrow images


@dataclass(frozen=True)
class Tile:
    """One image of a sheet: uint8 grey pixels (H, W) and the caption lines under it."""

    pixels: np.ndarray
    lines: tuple[tuple[str, Colour], ...]


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def _upscale(pixels: np.ndarray) -> Image.Image:
    """Grey image of a tile; small inputs are enlarged by a whole factor so they stay legible."""
    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="L")
    factor = max(1, MIN_TILE_WIDTH // max(1, image.width))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    return image


def draw_sheet(tiles: Sequence[Tile], title: str = "", columns: int = 3) -> Image.Image:
    """Lay ``tiles`` out in a grid, row by row, with ``title`` above it."""
    if not tiles:
        raise ValueError("a contact sheet needs at least one image")
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = _text_size(measure, "Ag|", font)[1] + 4
    images = [_upscale(tile.pixels) for tile in tiles]
    caption_width = max(_text_size(measure, text, font)[0] for tile in tiles for text, _ in tile.lines or [("", BLACK)])
    cell_width = max(MIN_TILE_WIDTH, max(im.width for im in images), caption_width) + 2 * PADDING
    max_lines = max(len(tile.lines) for tile in tiles)
    cell_height = max(im.height for im in images) + max_lines * line_height + 2 * PADDING
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    title_height = line_height + PADDING if title else 0
    title_width = _text_size(measure, title, font)[0] + 2 * PADDING if title else 0

    sheet = Image.new("RGB", (max(columns * cell_width, title_width), rows * cell_height + title_height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((PADDING, PADDING // 2), title, fill=BLACK, font=font)
    for index, (tile, image) in enumerate(zip(tiles, images, strict=True)):
        left = (index % columns) * cell_width + PADDING
        top = (index // columns) * cell_height + title_height + PADDING
        sheet.paste(image.convert("RGB"), (left, top))
        draw.rectangle((left - 1, top - 1, left + image.width, top + image.height), outline=GREY)
        y = top + image.height + 3
        for text, colour in tile.lines:
            draw.text((left, y), text, fill=colour, font=font)
            y += line_height
    return sheet


def save_png(image: Image.Image, path: Path) -> Path:
    """Write ``image`` through a temporary file and a rename, so readers never see half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def epoch_samples_sheet(epoch: int, pixels: np.ndarray, samples: Sequence[Mapping[str, str]]) -> Image.Image:
    """Draw the fixed validation samples of one epoch; each sample contains ``label`` and ``prediction``."""
    tiles = []
    for image, sample in zip(pixels, samples, strict=True):
        right = sample["label"] == sample["prediction"]
        tiles.append(Tile(image, (
            (f"true: {sample['label']}", BLACK),
            (f"read: {sample['prediction'] or '(nothing)'}", GREEN if right else RED),
        )))
    correct = sum(s["label"] == s["prediction"] for s in samples)
    return draw_sheet(tiles, f"Epoch {epoch}: {correct} of {len(tiles)} samples read correctly")


def write_epoch_samples(folder: Path, epoch: int, pixels: np.ndarray, samples: Sequence[Mapping[str, str]]) -> Path | None:
    """Save ``folder/epoch_NNN.png``; returns None when there are no samples or the file cannot be written.

    A picture that cannot be written costs a warning, never the training run.
    """
    if not len(samples):
        return None
    path = folder / f"epoch_{epoch:03d}.png"
    try:
        return save_png(epoch_samples_sheet(epoch, pixels, samples), path)
    except OSError as error:
        logger.warning("Could not write the sample predictions picture %s: %s", path, error)
        return None


def mistakes_sheet(
    pixels: Sequence[np.ndarray],
    mistakes: Sequence[Mapping[str, object]],
    title: str,
    columns: int = 4,
) -> Image.Image:
    """Draw misread images with their true label, the prediction and its confidence.

    Each mistake contains ``label``, ``prediction``, ``confidence`` and, optionally, ``path``.
    """
    tiles = []
    for image, mistake in zip(pixels, mistakes, strict=True):
        lines: list[tuple[str, Colour]] = [
            (f"true: {mistake['label']}", BLACK),
            (f"read: {mistake['prediction'] or '(nothing)'}  {float(mistake['confidence']):.2f}", RED),
        ]
        if mistake.get("path"):
            lines.append((_short_name(str(mistake["path"])), GREY))
        tiles.append(Tile(image, tuple(lines)))
    return draw_sheet(tiles, title, columns=columns)


def _short_name(path: str, limit: int = 24) -> str:
    name = Path(path).name
    return name if len(name) <= limit else name[: limit - 3] + "..."
