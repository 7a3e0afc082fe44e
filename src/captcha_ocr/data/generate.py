"""Synthetic CAPTCHAs drawn with the ``captcha`` package.

Labels come from a seeded random generator, so the same seed gives the same
labels and manifest. The ``captcha`` package draws its noise from ``secrets``,
so the pixels differ from run to run even with one seed.
"""

from __future__ import annotations

import csv
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from captcha_ocr.charset import resolve_charset

logger = logging.getLogger(__name__)

MAX_COUNT = 10_000_000
MAX_SIDE = 4096

# Characters the default label rule and file systems treat specially.
UNSAFE_FILE_NAME_CHARS = set("_-./\\:*?\"<>|")


@dataclass(frozen=True)
class GenerateSettings:
    count: int = 1000
    min_length: int = 4
    max_length: int = 4
    charset: str = "digits"
    width: int = 160
    height: int = 60
    seed: int = 0


def make_labels(settings: GenerateSettings) -> Iterator[str]:
    """Draw ``count`` labels from the seeded generator, one at a time; pixels are not involved."""
    alphabet = resolve_charset(settings.charset)
    rng = random.Random(settings.seed)
    for _ in range(settings.count):
        length = rng.randint(settings.min_length, settings.max_length)
        yield "".join(rng.choice(alphabet) for _ in range(length))


def check_settings(settings: GenerateSettings) -> None:
    """Reject settings that cannot produce images, or would exhaust memory or disk."""
    if not 1 <= settings.count <= MAX_COUNT:
        raise ValueError(f"count must be between 1 and {MAX_COUNT}, got {settings.count}")
    for name in ("width", "height"):
        value = getattr(settings, name)
        if not 16 <= value <= MAX_SIDE:
            raise ValueError(f"{name} must be between 16 and {MAX_SIDE} pixels, got {value}")
    if not 1 <= settings.min_length <= settings.max_length <= 64:
        raise ValueError(f"label length must be between 1 and 64, got {settings.min_length}-{settings.max_length}")


def generate(out_dir: Path, settings: GenerateSettings, progress: bool = True) -> Path:
    """Write ``count`` images named ``<label>_<index>.png`` and a ``labels.csv`` manifest.

    Returns the manifest path.
    """
    from captcha.image import ImageCaptcha

    alphabet = resolve_charset(settings.charset)
    unsafe = sorted(set(alphabet) & UNSAFE_FILE_NAME_CHARS)
    if unsafe:
        raise ValueError(f"charset characters {unsafe} cannot appear in file names; leave them out of --charset")
    check_settings(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawer = ImageCaptcha(width=settings.width, height=settings.height)
    labels = make_labels(settings)
    digits = len(str(settings.count - 1))
    rows = []
    bar = tqdm(labels, total=settings.count, desc="Generating", unit="img", disable=not progress, leave=False)
    for index, label in enumerate(bar):
        name = f"{label}_{index:0{digits}d}.png"
        drawer.generate_image(label).save(out_dir / name)
        rows.append((name, label))
    manifest = out_dir / "labels.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    logger.info("Generated %d images in %s (manifest %s)", len(rows), out_dir, manifest)
    return manifest
