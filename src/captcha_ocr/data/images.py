"""The one preprocessing path from an image file to the model's input.

Training, evaluation, prediction, ONNX export and the HTTP service all call
:func:`load_image` and :func:`to_model_input`, so an image is read the same way
everywhere. Only NumPy and Pillow are used, so the ONNX runtime path needs no
PyTorch.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp")

# 40 megapixels: far above any CAPTCHA, far below what exhausts memory.
DEFAULT_MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    """An input file that cannot be used as an image; the message gives the reason."""


@dataclass(frozen=True)
class Preprocessing:
    """Settings that turn a file into model input, stored in every checkpoint and ONNX file."""

    height: int = 64
    width: int = 192
    mean: float = 0.5
    std: float = 0.5
    max_pixels: int = DEFAULT_MAX_PIXELS

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        known = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
        return cls(**known)


def _open_checked(source: str | os.PathLike | bytes | Image.Image, max_pixels: int) -> Image.Image:
    """Open an image lazily and check its pixel count before any decoding."""
    if isinstance(source, Image.Image):
        image = source.copy()
    elif isinstance(source, bytes):
        if not source:
            raise ImageError("empty data (0 bytes)")
        handle = io.BytesIO(source)
    else:
        if os.path.getsize(source) == 0:
            raise ImageError("empty file (0 bytes)")
        handle = source
    if not isinstance(source, Image.Image):
        try:
            image = Image.open(handle)
        except UnidentifiedImageError:
            raise ImageError("not a recognised image format") from None
        except Image.DecompressionBombError as error:
            raise ImageError(f"refused as a decompression bomb: {error}") from None
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise ImageError(
            f"refused as a possible decompression bomb: {image.width}x{image.height} = "
            f"{pixels} pixels exceeds the limit of {max_pixels} (raise --max-pixels to allow it)"
        )
    return image


def _to_grey(image: Image.Image) -> Image.Image:
    """Convert any mode to 8-bit grey, flattening transparency onto white."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif image.mode in ("RGB", "L") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        return Image.fromarray(((array - low) * scale).astype(np.uint8), mode="L")
    return image.convert("L")


def load_image(
    source: str | os.PathLike | bytes | Image.Image,
    preprocessing: Preprocessing,
) -> np.ndarray:
    """Read one image and return it as uint8 grey pixels of shape (height, width).

    Raises :class:`ImageError` for empty, truncated, unknown or oversized input.
    GIFs and other multi-frame files contribute their first frame.
    """
    image = _open_checked(source, preprocessing.max_pixels)
    try:
        image.seek(0)
        image.load()
        grey = _to_grey(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"cannot decode image: {error}") from None
    finally:
        image.close()
    size = (preprocessing.width, preprocessing.height)
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(grey, dtype=np.uint8)


def to_model_input(pixels: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """Scale uint8 pixels (N, H, W) or (H, W) to the float32 (N, 1, H, W) model input."""
    if pixels.ndim == 2:
        pixels = pixels[None]
    scaled = pixels.astype(np.float32) / 255.0
    normalised = (scaled - preprocessing.mean) / preprocessing.std
    return normalised[:, None, :, :]


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES
