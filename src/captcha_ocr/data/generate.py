"""Synthetic CAPTCHAs drawn with the ``captcha`` package.

Labels come from a seeded random generator, so the same seed gives the same
labels and manifest. The ``captcha`` package draws its noise from ``secrets``,
so the pixels differ from run to run even with one seed.
"""

from __future__ import annotations

import csv
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from captcha_ocr.charset import resolve_charset

logger = logging.getLogger(__name__)

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


def make_labels(settings: GenerateSettings) -> list[str]:
    """Draw ``count`` labels from the seeded generator; pixels are not involved."""
    alphabet = resolve_charset(settings.charset)
    rng = random.Random(settings.seed)
    labels = []
    for _ in range(settings.count):
        length = rng.randint(settings.min_length, settings.max_length)
        labels.append("".join(rng.choice(alphabet) for _ in range(length)))
    return labels


def generate(out_dir: Path, settings: GenerateSettings, progress: bool = True) -> Path:
    """Write ``count`` images named ``<label>_<index>.png`` and a ``labels.csv`` manifest.

    Returns the manifest path.
    """
    from captcha.image import ImageCaptcha

    alphabet = resolve_charset(settings.charset)
    unsafe = sorted(set(alphabet) & UNSAFE_FILE_NAME_CHARS)
    if unsafe:
        raise ValueError(f"charset characters {unsafe} cannot appear in file names; leave them out of --charset")
    if settings.count <= 0:
        raise ValueError(f"count must be positive, got {settings.count}")
    out_dir.mkdir(parents=True, exist_ok=True)
    drawer = ImageCaptcha(width=settings.width, height=settings.height)
    labels = make_labels(settings)
    digits = len(str(settings.count - 1))
    rows = []
    bar = tqdm(labels, desc="Generating", unit="img", disable=not progress, leave=False)
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
