"""From a training configuration to decoded, checked train and validation sets.

Every check that can fail on the data runs here, before the first epoch:
unreadable files, decompression bombs, labels outside an explicit charset and
labels too long for the model's output steps.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from captcha_ocr.charset import Codec, min_ctc_steps, resolve_charset
from captcha_ocr.config import TrainConfig, parse_length_range
from captcha_ocr.data.dataset import DecodedSet, decode_samples, split_indices
from captcha_ocr.data.generate import GenerateSettings, generate
from captcha_ocr.data.images import Preprocessing
from captcha_ocr.data.sources import Collected, Sample, collect

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """The data cannot be used for training; the message names the file or source and the fix.

    ``skipped`` lists the files left out before the problem was found, for skipped.txt.
    """

    def __init__(self, message: str, skipped: list[tuple[Path, str]] | None = None) -> None:
        super().__init__(message)
        self.skipped = list(skipped or [])


class _SkipList(list):
    """Files left out, each reported as one warning the moment it is added."""

    def __init__(self, warn: bool) -> None:
        super().__init__()
        self.warn = warn

    def add(self, entries: list[tuple[Path, str]]) -> None:
        for path, reason in entries:
            self.append((path, reason))
            if self.warn:
                logger.warning("Skipped %s: %s", path, reason)


@dataclass
class PreparedData:
    train: DecodedSet
    val: DecodedSet
    codec: Codec
    sources: list[str]
    val_sources: list[str]
    found: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    from_split: bool = True
    val_unknown_chars: str = ""


def synthetic_folder(config: TrainConfig) -> Path:
    low, high = parse_length_range(config.synthetic_length)
    name = f"synthetic_{config.synthetic_charset}_{low}-{high}_{config.synthetic_count}_seed{config.seed}"
    return Path(config.output_dir) / "data" / name


def ensure_synthetic_set(config: TrainConfig, progress: bool) -> Path:
    """Generate the built-in training set once and reuse it on later runs."""
    folder = synthetic_folder(config)
    manifest = folder / "labels.csv"
    if manifest.is_file():
        logger.info("Using the generated data set cached in %s", folder)
        return manifest
    low, high = parse_length_range(config.synthetic_length)
    settings = GenerateSettings(
        count=config.synthetic_count, min_length=low, max_length=high,
        charset=config.synthetic_charset, width=160, height=60, seed=config.seed,
    )
    logger.info(
        "No training data given: generating %d images (%s characters from '%s') in %s",
        settings.count, config.synthetic_length, config.synthetic_charset, folder,
    )
    partial = folder.with_name(folder.name + ".partial")
    generate(partial, settings, progress=progress)
    partial.rename(folder)
    logger.info("Generated data set ready in %s", folder)
    return manifest


def _collect(sources: list[str], config: TrainConfig) -> Collected:
    return collect(
        sources, label_pattern=config.label_pattern, ignore_case=config.ignore_case,
        path_column=config.path_column, label_column=config.label_column,
    )


def _filter_labels(
    samples: list[Sample], codec: Codec | None, steps: int, config: TrainConfig, skipped: _SkipList
) -> list[Sample]:
    """Drop labels with characters outside ``codec`` and, when asked, labels too long for ``steps``."""
    kept = []
    for sample in samples:
        if codec is not None:
            unknown = codec.unknown_chars(sample.label)
            if unknown:
                skipped.add([(sample.path, f"label {sample.label!r} has characters outside the charset: {unknown!r}")])
                continue
        needed = min_ctc_steps(sample.label)
        if needed > steps:
            if config.too_long_labels == "error":
                raise DataError(too_long_message(sample, needed, steps, config.width))
            skipped.add([(sample.path, f"label {sample.label!r} needs {needed} output steps, the model emits {steps}")])
            continue
        kept.append(sample)
    return kept


def _drop_duplicates(samples: list[Sample], seen: dict[Path, str], skipped: _SkipList) -> list[Sample]:
    """Keep the first mention of each file; later ones (in any split) are skipped with the reason.

    ``seen`` carries the files already taken across calls, so a file cannot be
    in both the training and the validation data.
    """
    kept = []
    for sample in samples:
        key = sample.path.resolve()
        if key in seen:
            first = seen[key]
            detail = f"the same label {first!r}" if first == sample.label else f"label {first!r}, not {sample.label!r}"
            skipped.add([(sample.path, f"file listed more than once, first with {detail}")])
            continue
        seen[key] = sample.label
        kept.append(sample)
    return kept


def too_long_message(sample: Sample, needed: int, steps: int, width: int) -> str:
    repeats = needed - len(sample.label)
    # The model's steps grow in proportion to the width in multiples of 16 pixels.
    suggested = -(-math.ceil(needed * width / steps) // 16) * 16
    return (
        f"{sample.path}: label {sample.label!r} ({len(sample.label)} characters, {repeats} repeated "
        f"neighbours) needs {needed} CTC output steps, but the model emits only {steps} at --width {width}. "
        f"Train with --width {suggested} or more, "
        "or leave such files out with --too-long-labels skip"
    )


def prepare_data(
    config: TrainConfig,
    steps: int,
    preprocessing: Preprocessing,
    alphabet: str | None = None,
    progress: bool = True,
    warn: bool = True,
) -> PreparedData:
    """Collect, check, decode and split the training and validation data.

    ``alphabet`` fixes the codec (when resuming); otherwise an explicit
    ``config.charset`` does, and failing that the labels define it. With
    ``warn``, each file left out is logged as one warning as soon as it is
    found, so the warnings are in the log even when a :class:`DataError` follows.
    """
    skipped = _SkipList(warn)
    try:
        return _prepare(config, steps, preprocessing, alphabet, progress, skipped)
    except DataError as error:
        error.skipped = list(skipped)
        raise


def _prepare(
    config: TrainConfig,
    steps: int,
    preprocessing: Preprocessing,
    alphabet: str | None,
    progress: bool,
    skipped: _SkipList,
) -> PreparedData:
    train_sources = list(config.data) or [str(ensure_synthetic_set(config, progress))]
    cache_dir = Path(config.output_dir) / "cache"
    collected = _collect(train_sources, config)
    skipped.add(collected.skipped)
    found = len(collected.samples) + len(collected.skipped)
    seen: dict[Path, str] = {}
    collected.samples = _drop_duplicates(collected.samples, seen, skipped)

    fixed = alphabet or (resolve_charset(config.charset) if config.charset else None)
    codec = Codec(fixed) if fixed else None
    samples = _filter_labels(collected.samples, codec, steps, config, skipped)
    decoded, failed = decode_samples(samples, preprocessing, cache_dir, progress, "Decoding training images")
    skipped.add(failed)

    if config.val:
        val_collected = _collect(list(config.val), config)
        skipped.add(val_collected.skipped)
        found += len(val_collected.samples) + len(val_collected.skipped)
        val_collected.samples = _drop_duplicates(val_collected.samples, seen, skipped)
        val_samples = _filter_labels(val_collected.samples, codec, steps, config, skipped)
        val, failed = decode_samples(val_samples, preprocessing, cache_dir, progress, "Decoding validation images")
        skipped.add(failed)
        train = decoded
        from_split = False
    else:
        if len(decoded) < 2:
            raise DataError(_nothing_left(train_sources, found, len(decoded), "at least 2 are needed to split off validation"))
        try:
            train_index, val_index = split_indices(len(decoded), config.val_split, config.seed)
        except ValueError as error:
            raise DataError(f"{error}; lower --val-split ({config.val_split}) or add images") from None
        train, val = decoded.subset(train_index), decoded.subset(val_index)
        from_split = True

    if len(train) == 0:
        raise DataError(_nothing_left(train_sources, found, 0, "no training image is usable"))
    if len(val) == 0:
        raise DataError(_nothing_left(list(config.val), found, 0, "no validation image is usable"))

    # Characters seen only in validation labels still get a class, so that those
    # labels can be encoded and scored (as errors) rather than crash validation.
    trained = Codec.from_labels(train.labels)
    val_unknown = "".join(sorted({c for label in val.labels for c in trained.unknown_chars(label)}))
    codec = codec or Codec.from_labels(train.labels + val.labels)
    return PreparedData(
        train=train, val=val, codec=codec, sources=train_sources, val_sources=list(config.val),
        found=found, skipped=list(skipped), from_split=from_split, val_unknown_chars=val_unknown,
    )


def _nothing_left(sources: list[str], found: int, usable: int, why: str) -> str:
    return (
        f"no usable images in {', '.join(sources) or 'the data'}: {found} files found, {usable} usable, {why}. "
        "See the warnings above and the run folder's skipped.txt for each file's reason"
    )


def describe_split(data: DecodedSet) -> dict:
    lengths = Counter(len(label) for label in data.labels)
    return {
        "count": len(data),
        "label_lengths": {str(k): v for k, v in sorted(lengths.items())},
        "file_list_sha256": data.file_list_hash(),
    }


def describe_data(prepared: PreparedData) -> dict:
    """Build the contents of data.json: sources, counts, charset, label lengths, split hashes."""
    overlap = len({str(p) for p in prepared.train.paths} & {str(p) for p in prepared.val.paths})
    reasons = Counter(_reason_kind(reason) for _, reason in prepared.skipped)
    return {
        "sources": prepared.sources,
        "val_sources": prepared.val_sources,
        "validation_from_split": prepared.from_split,
        "files_found": prepared.found,
        "files_skipped": len(prepared.skipped),
        "skipped_by_reason": dict(reasons),
        "charset": prepared.codec.alphabet,
        "num_classes": prepared.codec.num_classes,
        "train": describe_split(prepared.train),
        "val": describe_split(prepared.val),
        "files_in_both_splits": overlap,
        "val_characters_not_in_charset": prepared.val_unknown_chars,
        "mean_pixel": float(np.mean(prepared.train.pixels)) if len(prepared.train) else None,
    }


def _reason_kind(reason: str) -> str:
    """Group skip reasons for the log's counts, without per-file details."""
    if reason.startswith("label "):
        return "label outside the charset" if "outside the charset" in reason else "label too long for the model"
    if "decompression bomb" in reason:
        return "decompression bomb refused"
    if reason.startswith("not an image file"):
        return "not an image file"
    if reason.startswith("file listed more than once"):
        return "file listed more than once"
    return reason.split(":")[0].split("(")[0].strip()


def skipped_by_reason(skipped: list[tuple[Path, str]]) -> dict[str, int]:
    return dict(Counter(_reason_kind(reason) for _, reason in skipped))
