"""TrainConfig: the typed, validated training configuration.

Values come from the defaults below, then a TOML or YAML file, then command-line
flags, in that order. :meth:`TrainConfig.validate` reports every problem at once.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from captcha_ocr.data.images import DEFAULT_MAX_PIXELS
from captcha_ocr.data.sources import DEFAULT_LABEL_PATTERN

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Training sets smaller than this are augmented by default and take smaller batches.
SMALL_SET_IMAGES = 20_000
# Default batch sizes below and above that size. Smaller batches give a small set
# twice the steps per epoch, and on a CPU an epoch takes about as long. On two
# captcha_images_v2 splits (936 training images), batches of 16 first reached 50%
# validation accuracy at epochs 6 and 8, batches of 32 at epochs 13 and 11.
SMALL_SET_BATCH = 16
LARGE_SET_BATCH = 32
# Networks one model may train side by side (--members). Each one adds a full
# network to train and to read.
MAX_MEMBERS = 8
# The rule that batch_size 0 follows, as the help and the training log state it.
AUTO_BATCH_RULE = f"{SMALL_SET_BATCH} for sets under {SMALL_SET_IMAGES} training images, else {LARGE_SET_BATCH}"


class ConfigError(ValueError):
    """An invalid configuration; the message lists every problem found."""


def parse_duration(text: str | float | int | None) -> float | None:
    """Parse '90', '90s', '30m', '1.5h' or '1h30m' into seconds; None stays None."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd]?)", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s+", "", text.strip().lower()):
        raise ConfigError(f"invalid duration {text!r}: use seconds or a unit, such as 90s, 30m or 1h30m")
    return sum(float(number) * DURATION_UNITS[unit or "s"] for number, unit in parts)


def _option(default: Any, help: str, **extra: Any) -> Any:
    metadata = {"help": help, **extra}
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every setting of a training session; logged in full and saved with the run."""

    data: list[str] = _option([], "image folders or CSV/TSV manifests to train on; none: a generated set", cli=False)
    val: list[str] = _option([], "separate validation folders or manifests (default: split off --val-split)")
    val_split: float = _option(0.1, "fraction of the training data held out for validation when --val is not given")
    seed: int = _option(42, "random seed for the split, initialisation, shuffling and augmentation")
    label_pattern: str = _option(
        DEFAULT_LABEL_PATTERN,
        "regular expression applied to the file stem; its first group (or whole match) is the label",
    )
    ignore_case: bool = _option(False, "fold labels and predictions to lower case")
    charset: str | None = _option(
        None, "allowed characters (named sets such as digits, lower, alnum, joined with +); "
        "labels using others are skipped. Default: every character of the training labels",
    )
    path_column: str | None = _option(None, "manifest column holding image paths (default: detected)")
    label_column: str | None = _option(None, "manifest column holding labels (default: detected)")
    height: int = _option(48, "image height in pixels after resizing (a multiple of 16)")
    width: int = _option(192, "image width in pixels after resizing; the model emits 2 output steps per whole 16 pixels of width (24 at 192), and a label needs one per character plus one between equal neighbours")
    epochs: int = _option(60, "maximum number of epochs")
    batch_size: int = _option(
        0,
        f"images per optimizer step on each process; 0: {AUTO_BATCH_RULE}, so that small sets get more "
        "steps per epoch",
    )
    lr: float = _option(3e-3, "peak learning rate of Adam")
    weight_decay: float = _option(1e-5, "Adam weight decay")
    warmup_steps: int = _option(100, "optimizer steps of linear learning-rate warm-up from lr/10")
    lr_factor: float = _option(0.5, "ReduceLROnPlateau: factor applied to the learning rate")
    lr_patience: int = _option(3, "ReduceLROnPlateau: epochs without validation-loss improvement before reducing")
    lr_threshold: float = _option(
        1e-4, "ReduceLROnPlateau: relative drop of the validation loss that counts as an improvement"
    )
    min_lr: float = _option(1e-5, "lowest learning rate of ReduceLROnPlateau, and the rate the final decay ends at")
    decay_fraction: float = _option(
        0.4,
        "fraction of training, counted back from its end (in --epochs, or in --max-time when that ends the run "
        "first), over which the learning rate falls linearly to --min-lr instead of following ReduceLROnPlateau; 0: off",
    )
    ema_decay: float = _option(
        0.99,
        "decay per optimizer step of the moving average of the weights that validation, checkpoints "
        "and the model file use; 0: no average, the trained weights themselves",
    )
    grad_clip: float = _option(5.0, "maximum gradient norm; 0 disables clipping")
    augment: str = _option("auto", f"augmentation: on, off, or auto (on for sets under {SMALL_SET_IMAGES} images)",
                           choices=("auto", "on", "off"))
    augment_from: float = _option(
        0.3,
        "validation accuracy at which augmentation starts, so that the model first learns to read "
        "clean images; 0: from the first step",
    )
    early_stop_patience: int = _option(0, "stop after this many epochs without a better validation accuracy; 0: off")
    max_time: str | None = _option(None, "time budget for training, such as 30m or 2h (default: none); no epoch starts that would end past it")
    device: str = _option("auto", "auto, cpu, cuda or cuda:N")
    precision: str = _option("fp32", "fp32, or bf16/fp16 mixed precision on CUDA", choices=("fp32", "bf16", "fp16"))
    threads: int = _option(0, "CPU threads for PyTorch; 0: one per core (per process under torchrun)")
    output_dir: str = _option("outputs", "folder for logs/, runs/, models/ and the generated-data cache")
    channels: list[int] = _option([16, 32, 64, 64, 96], "output channels of the five convolution layers")
    rnn_hidden: int = _option(128, "hidden units per direction of the LSTM")
    rnn_layers: int = _option(2, "number of bidirectional LSTM layers")
    dropout: float = _option(0.2, "dropout before and between the LSTM layers")
    members: int = _option(
        1,
        "networks trained side by side from different random weights and read together, their readings "
        f"combined as shifted views are; training and reading time grow with their number (1 to {MAX_MEMBERS})",
    )
    fine_head_at: float = _option(
        0.3,
        "validation accuracy at which the output switches from the coarse head (width/16 steps) "
        "to the fine head (width/8 steps); 0: after the first epoch",
    )
    presence_weight: float = _option(
        1.0,
        "weight of the character-presence loss on the coarse head, which asks that each character "
        "of the label appear at some step and no other character at any; 0: off",
    )
    keep_lengths: bool = _option(
        True,
        "read only the label lengths seen in training: where the best reading has another length, "
        "take the most probable reading that has one of them (the model file records the lengths)",
    )
    max_pixels: int = _option(DEFAULT_MAX_PIXELS, "images with more pixels are refused before decoding")
    too_long_labels: str = _option(
        "error", "labels the model cannot emit at this width: error (stop before training) or skip",
        choices=("error", "skip"),
    )
    sample_count: int = _option(6, "fixed validation samples whose predictions are logged each epoch")
    synthetic_count: int = _option(3000, "images in the generated set used when no data is given")
    synthetic_length: str = _option("4", "label length of the generated set, such as 4 or 4-6")
    synthetic_charset: str = _option("digits", "charset of the generated set")
    synthetic_epochs: int = _option(15, "maximum epochs on the generated set when neither --epochs nor DATA is given")
    tensorboard: bool = _option(False, "also write TensorBoard scalars to the run folder")

    @classmethod
    def from_file(cls, path: str | Path) -> dict[str, Any]:
        """Read settings from a TOML or YAML file; returns only the keys it sets."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: configuration file not found")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python < 3.11
                import tomli as tomllib
            try:
                values = tomllib.loads(text)
            except tomllib.TOMLDecodeError as error:
                raise ConfigError(f"{path}: invalid TOML: {error}") from None
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                values = yaml.safe_load(text) or {}
            except yaml.YAMLError as error:
                raise ConfigError(f"{path}: invalid YAML: {error}") from None
        else:
            raise ConfigError(f"{path}: configuration file must end in .toml, .yaml or .yml")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a table of settings at the top level")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown settings {unknown}; see 'captcha-ocr train --help'")
        return values

    @classmethod
    def build(cls, *layers: dict[str, Any]) -> TrainConfig:
        """Merge layers of settings (later wins), convert types, validate."""
        merged: dict[str, Any] = {}
        for layer in layers:
            merged.update({k: v for k, v in layer.items() if v is not None or k in ("charset", "max_time")})
        config = cls(**_coerce_types(merged))
        config.validate()
        return config

    def batch_size_for(self, train_count: int) -> int:
        """Return the batch size to train ``train_count`` images with: the setting, or the default for the set's size."""
        if self.batch_size:
            return self.batch_size
        return SMALL_SET_BATCH if train_count < SMALL_SET_IMAGES else LARGE_SET_BATCH

    def augments(self, train_count: int) -> bool:
        """Return whether ``train_count`` training images are augmented under this setting."""
        return self.augment == "on" or (self.augment == "auto" and train_count < SMALL_SET_IMAGES)

    def validate(self) -> None:
        problems = []
        for spec in fields(self):
            choices = spec.metadata.get("choices")
            value = getattr(self, spec.name)
            if choices and value not in choices:
                problems.append(f"{spec.name}={value!r} is not one of {list(choices)}")
        for name in ("lr", "weight_decay", "lr_factor", "min_lr", "grad_clip", "dropout", "val_split", "fine_head_at", "augment_from", "presence_weight", "lr_threshold", "ema_decay", "decay_fraction"):
            value = getattr(self, name)
            if not math.isfinite(value):
                problems.append(f"{name} must be a finite number, got {value}")
        if self.weight_decay < 0 or self.min_lr < 0:
            problems.append(f"weight_decay and min_lr must not be negative, got {self.weight_decay} and {self.min_lr}")
        if not 0 <= self.seed < 2**32:
            problems.append(f"seed must be between 0 and 2**32 - 1, got {self.seed}")
        if self.threads > 1024:
            problems.append(f"threads must be at most 1024, got {self.threads}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            problems.append(f"device {self.device!r} is not one of auto, cpu, cuda, cuda:N, mps")
        if not self.output_dir.strip():
            problems.append("output_dir is empty: give a folder such as outputs")
        elif Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            problems.append(f"output_dir {self.output_dir!r} exists and is not a folder")
        for name in ("data", "val"):
            if any(not str(item).strip() for item in getattr(self, name)):
                problems.append(f"{name} contains an empty path")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 0:
            problems.append(f"batch_size must be a positive integer, or 0 to choose by the set's size; got {self.batch_size!r}")
        positive = ("height", "width", "epochs", "synthetic_epochs", "sample_count", "synthetic_count", "rnn_hidden", "rnn_layers", "max_pixels", "members")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.members, int) and self.members > MAX_MEMBERS:
            problems.append(f"members must be at most {MAX_MEMBERS}, got {self.members}")
        if not 0.0 <= self.val_split < 1.0:
            problems.append(f"val_split must be in [0, 1), got {self.val_split}")
        if not self.val and self.val_split == 0.0:
            problems.append("no validation data: give --val DATA or a --val-split above 0")
        if isinstance(self.height, int) and self.height % 16:
            problems.append(f"height must be a multiple of 16, got {self.height}")
        if self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if not 0.0 < self.lr_factor < 1.0:
            problems.append(f"lr_factor must be in (0, 1), got {self.lr_factor}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            problems.append(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.lr_threshold < 1.0:
            problems.append(f"lr_threshold must be in [0, 1), got {self.lr_threshold}")
        if math.isfinite(self.fine_head_at) and not 0.0 <= self.fine_head_at <= 1.0:
            problems.append(f"fine_head_at must be in [0, 1], got {self.fine_head_at}")
        if math.isfinite(self.augment_from) and not 0.0 <= self.augment_from <= 1.0:
            problems.append(f"augment_from must be in [0, 1], got {self.augment_from}")
        for name in ("warmup_steps", "lr_patience", "early_stop_patience", "threads"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if self.grad_clip < 0:
            problems.append(f"grad_clip must not be negative, got {self.grad_clip}")
        if len(self.channels) != 5 or any(c <= 0 for c in self.channels):
            problems.append(f"channels needs 5 positive values, got {self.channels}")
        try:
            parse_duration(self.max_time)
        except ConfigError as error:
            problems.append(str(error))
        try:
            parse_length_range(self.synthetic_length)
        except ValueError as error:
            problems.append(str(error))
        try:
            re.compile(self.label_pattern)
        except re.error as error:
            problems.append(f"label_pattern {self.label_pattern!r} is not a valid regular expression: {error}")
        if problems:
            raise ConfigError("invalid training configuration: " + "; ".join(problems))

    @property
    def max_time_seconds(self) -> float | None:
        return parse_duration(self.max_time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_defaults(cls) -> dict[str, Any]:
        defaults = {}
        for spec in fields(cls):
            if spec.default is not MISSING:
                defaults[spec.name] = spec.default
            else:
                defaults[spec.name] = spec.default_factory()
        return defaults


_SCALAR_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _coerce_types(values: dict[str, Any]) -> dict[str, Any]:
    """Check each setting's type against TrainConfig's annotations (ints may stand for floats).

    Settings from TOML or YAML files arrive untyped, so a quoted number or a
    scalar where a list belongs is reported here instead of failing later.
    """
    problems = []
    coerced = dict(values)
    for spec in fields(TrainConfig):
        if spec.name not in values:
            continue
        value = values[spec.name]
        annotation = str(spec.type).replace(" | None", "")
        optional = " | None" in str(spec.type)
        if value is None and optional:
            continue
        if annotation.startswith("list["):
            item_type = _SCALAR_TYPES[annotation[5:-1]]
            if not isinstance(value, (list, tuple)) or not all(_fits(v, item_type) for v in value):
                problems.append(f"{spec.name} must be a list of {annotation[5:-1]}, got {value!r}")
            else:
                coerced[spec.name] = [item_type(v) for v in value]
            continue
        expected = _SCALAR_TYPES[annotation]
        if not _fits(value, expected):
            problems.append(f"{spec.name} must be {'a' if expected is not int else 'an'} {annotation}, got {value!r}")
        else:
            coerced[spec.name] = expected(value)
    unknown = sorted(set(values) - {f.name for f in fields(TrainConfig)})
    if unknown:
        problems.append(f"unknown settings {unknown}")
    if problems:
        raise ConfigError("invalid training configuration: " + "; ".join(problems))
    return coerced


def _fits(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def parse_length_range(text: str | int) -> tuple[int, int]:
    """Parse a label length '4' or range '4-6' into (minimum, maximum)."""
    text = str(text).strip()
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
    if not match:
        raise ValueError(f"invalid length {text!r}: use a number such as 4 or a range such as 4-6")
    low = int(match.group(1))
    high = int(match.group(2) or low)
    if low < 1 or high < low:
        raise ValueError(f"invalid length {text!r}: need 1 <= minimum <= maximum")
    return low, high
