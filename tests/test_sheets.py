"""Contact sheets: the epoch sample pictures and the sheet of misread images."""

import logging

import numpy as np
import pytest
from PIL import Image

from captcha_ocr.record import sheets
from captcha_ocr.record.sheets import (
    Tile,
    draw_sheet,
    epoch_samples_sheet,
    mistakes_sheet,
    write_epoch_samples,
)


def _pixels(count: int, height: int = 32, width: int = 96) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(count, height, width), dtype=np.uint8)


def _has_colour(image: Image.Image, red: bool) -> bool:
    """Whether any pixel is clearly red (or clearly green): caption text in that colour."""
    rgb = np.asarray(image.convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if red:
        return bool(((r > 150) & (g < 80) & (b < 80)).any())
    return bool(((g > 90) & (r < 60) & (b < 60)).any())


def test_grid_grows_with_tiles():
    tiles = [Tile(p, (("true: 1234", (0, 0, 0)),)) for p in _pixels(6)]
    one_row = draw_sheet(tiles[:3], columns=3)
    two_rows = draw_sheet(tiles, columns=3)
    assert two_rows.width == one_row.width
    assert two_rows.height > 1.8 * one_row.height
    single_column = draw_sheet(tiles, columns=1)
    assert single_column.width < one_row.width
    assert single_column.height > two_rows.height


def test_wrong_red_right_green():
    right = [{"label": "1234", "prediction": "1234"}, {"label": "5678", "prediction": "5678"}]
    wrong = [{"label": "1234", "prediction": "1284"}, {"label": "5678", "prediction": ""}]
    all_right = epoch_samples_sheet(1, _pixels(2), right)
    assert _has_colour(all_right, red=False)
    assert not _has_colour(all_right, red=True)
    all_wrong = epoch_samples_sheet(1, _pixels(2), wrong)
    assert _has_colour(all_wrong, red=True)
    assert not _has_colour(all_wrong, red=False)


def test_epoch_picture_names(tmp_path):
    samples = [{"label": "12", "prediction": "12"}]
    path = write_epoch_samples(tmp_path / "samples", 7, _pixels(1), samples)
    assert path == tmp_path / "samples" / "epoch_007.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
    assert write_epoch_samples(tmp_path / "samples", 8, _pixels(0), []) is None
    assert not (tmp_path / "samples" / "epoch_008.png").exists()
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["epoch_007.png"]


def test_unwritable_picture_only_warns(tmp_path):
    blocked = tmp_path / "samples"
    blocked.write_text("a file where the folder should be")
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logger = logging.getLogger(sheets.__name__)
    logger.addHandler(handler)
    try:
        assert write_epoch_samples(blocked, 1, _pixels(1), [{"label": "1", "prediction": "2"}]) is None
    finally:
        logger.removeHandler(handler)
    assert len(warnings) == 1
    assert "Could not write the sample predictions picture" in warnings[0]


def test_small_images_enlarged():
    sheet = mistakes_sheet(_pixels(1, height=16, width=40), [{"label": "ab", "prediction": "a", "confidence": 0.5}], "t")
    assert sheet.width >= 150


def test_empty_sheet_rejected():
    with pytest.raises(ValueError, match="at least one image"):
        draw_sheet([])
