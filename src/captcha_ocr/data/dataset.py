"""Decoded-once image sets, train/validation splits, batches and augmentation.

Every image is decoded and resized once before training starts, so a broken
file is found before the first epoch and epochs are bound by compute, not by
Pillow. The decoded pixels are cached on disk, keyed by each file's path, size
and modification time and by the preprocessing settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from captcha_ocr.charset import Codec
from captcha_ocr.data.images import ImageError, Preprocessing, load_image, to_model_input
from captcha_ocr.data.sources import Sample

logger = logging.getLogger(__name__)


@dataclass
class DecodedSet:
    """Images decoded to uint8 pixels (N, H, W) with their labels and paths."""

    pixels: np.ndarray
    labels: list[str]
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray | list[int]) -> DecodedSet:
        indices = np.asarray(indices, dtype=np.int64)
        return DecodedSet(self.pixels[indices], [self.labels[i] for i in indices], [self.paths[i] for i in indices])

    def file_list_hash(self) -> str:
        """SHA-256 of the sorted file paths, to spot the same files in two splits or runs."""
        digest = hashlib.sha256()
        for path in sorted(str(p) for p in self.paths):
            digest.update(path.encode("utf-8") + b"\n")
        return digest.hexdigest()


def _cache_key(samples: list[Sample], preprocessing: Preprocessing) -> str:
    digest = hashlib.sha256(json.dumps(preprocessing.to_dict(), sort_keys=True).encode())
    for sample in samples:
        try:
            stat = os.stat(sample.path)
            digest.update(f"{sample.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{sample.path}|missing\n".encode())
    return digest.hexdigest()[:24]


def _decode_one(sample: Sample, preprocessing: Preprocessing) -> np.ndarray | str:
    try:
        return load_image(sample.path, preprocessing)
    except ImageError as error:
        return str(error)
    except OSError as error:
        return f"cannot read file: {error.strerror or error}"


def decode_samples(
    samples: list[Sample],
    preprocessing: Preprocessing,
    cache_dir: Path | None = None,
    progress: bool = True,
    description: str = "Decoding",
) -> tuple[DecodedSet, list[tuple[Path, str]]]:
    """Decode every sample once; returns the decoded set and the (path, reason) of files skipped."""
    cache_file = None
    if cache_dir is not None and samples:
        key = _cache_key(samples, preprocessing)
        cache_file = cache_dir / f"images_{key}.npz"
        if cache_file.is_file():
            try:
                with np.load(cache_file, allow_pickle=False) as cached:
                    pixels, ok, reasons = cached["pixels"], cached["ok"], cached["reasons"]
                if len(ok) == len(samples):
                    logger.debug("Loaded %d decoded images from cache %s", len(samples), cache_file)
                    return _assemble(samples, pixels, ok, [str(r) for r in reasons])
            except (OSError, KeyError, ValueError) as error:
                logger.warning("Ignoring unreadable image cache %s: %s", cache_file, error)

    height, width = preprocessing.height, preprocessing.width
    pixels = np.zeros((len(samples), height, width), dtype=np.uint8)
    ok = np.zeros(len(samples), dtype=bool)
    reasons = [""] * len(samples)
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda s: _decode_one(s, preprocessing), samples, chunksize=16)
        bar = tqdm(results, total=len(samples), desc=description, unit="img", disable=not progress, leave=False)
        for index, result in enumerate(bar):
            if isinstance(result, str):
                reasons[index] = result
            else:
                pixels[index] = result
                ok[index] = True

    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_name(f".{cache_file.name}.tmp-{os.getpid()}.npz")
        np.savez(temporary, pixels=pixels, ok=ok, reasons=np.array(reasons, dtype=str))
        os.replace(temporary, cache_file)
    return _assemble(samples, pixels, ok, reasons)


def _assemble(
    samples: list[Sample], pixels: np.ndarray, ok: np.ndarray, reasons: list[str]
) -> tuple[DecodedSet, list[tuple[Path, str]]]:
    keep = np.flatnonzero(ok)
    decoded = DecodedSet(pixels[keep], [samples[i].label for i in keep], [samples[i].path for i in keep])
    skipped = [(samples[i].path, reasons[i]) for i in np.flatnonzero(~ok)]
    return decoded, skipped


def split_indices(count: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle ``range(count)`` with ``seed`` and cut off the validation fraction (at least one)."""
    order = np.random.default_rng(seed).permutation(count)
    val_count = max(1, round(count * val_fraction)) if val_fraction > 0 else 0
    if val_count >= count:
        raise ValueError(f"cannot split {count} images: the validation part would take all of them")
    return np.sort(order[val_count:]), np.sort(order[:val_count])


@dataclass
class Batch:
    images: torch.Tensor  # (N, 1, H, W) float32
    targets: torch.Tensor  # (sum of label lengths,) int64, concatenated
    target_lengths: torch.Tensor  # (N,) int64
    labels: list[str]


def make_batch(decoded: DecodedSet, indices: np.ndarray, codec: Codec, preprocessing: Preprocessing) -> Batch:
    inputs = torch.from_numpy(to_model_input(decoded.pixels[indices], preprocessing))
    labels = [decoded.labels[i] for i in indices]
    encoded = [codec.encode(label) for label in labels]
    targets = torch.tensor([c for code in encoded for c in code], dtype=torch.long)
    lengths = torch.tensor([len(code) for code in encoded], dtype=torch.long)
    return Batch(inputs, targets, lengths, labels)


def augment(images: torch.Tensor, generator: torch.Generator, background: float) -> torch.Tensor:
    """Apply a small random affine warp and contrast change to a batch (N, 1, H, W).

    The warp stays small (a few degrees, a few percent) so that characters never
    leave the frame; the uncovered border is filled with ``background``.
    """
    n = images.shape[0]
    device = images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    angle = uniform(-4.0, 4.0) * math.pi / 180
    scale = uniform(0.92, 1.08)
    shear = uniform(-0.15, 0.15)
    shift_x = uniform(-0.04, 0.04)
    shift_y = uniform(-0.08, 0.08)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos, -sin + shear, shift_x], dim=1),
            torch.stack([sin, cos, shift_y], dim=1),
        ],
        dim=1,
    ).to(device)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped = warped + background
    contrast = uniform(0.8, 1.2).to(device).view(n, 1, 1, 1)
    mean = warped.mean(dim=(2, 3), keepdim=True)
    return (warped - mean) * contrast + mean
