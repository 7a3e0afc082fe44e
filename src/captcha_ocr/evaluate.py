"""Evaluation of a trained model on labelled images.

:func:`run_evaluation` reads every image of the given folders or manifests, or
only the held-out part that ``captcha-ocr train`` split off with the same
fraction and seed. A :class:`~captcha_ocr.predict.Recognizer` (``.pth`` or
``.onnx``) reads the images, and the report gives whole-label accuracy, character error rate,
accuracy per label length, the most confused characters, mean confidence of
right and wrong predictions, speed and the worst mistakes. The report goes to
``outputs/logs/evaluation_<ID>.log`` and to a JSON file; misread images can go
to a PNG contact sheet.

The held-out part is chosen exactly as :func:`captcha_ocr.data.prepare.prepare_data`
chooses it: the same collection order, the same label filters, the same decode
failures dropped, then :func:`captcha_ocr.data.dataset.split_indices`. When the
training run's folder is found, its label rule, case folding and seed are the
defaults, and the files are checked against the run's validation file list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from captcha_ocr.data.images import ImageError, Preprocessing, load_image
from captcha_ocr.data.sources import DEFAULT_LABEL_PATTERN, Sample, collect
from captcha_ocr.metrics import character_errors, confusion_pairs, edit_distance
from captcha_ocr.predict import DEFAULT_VIEWS
from captcha_ocr.record import report
from captcha_ocr.record.log import (
    ConsoleHandler,
    get_package_logger,
    new_log_id,
    remove_handlers,
    setup_logging,
)
from captcha_ocr.record.run import write_json
from captcha_ocr.record.sheets import mistakes_sheet, save_png

logger = logging.getLogger(__name__)

SHEET_LIMIT = 60  # misread images drawn on the contact sheet, worst first


class EvaluationError(ValueError):
    """Raised when no image can be evaluated; the message gives the reason."""


@dataclass
class EvaluationSettings:
    """How to collect and score the images; None means "as the model was trained"."""

    ignore_case: bool | None = None
    label_pattern: str | None = None
    path_column: str | None = None
    label_column: str | None = None
    val_split: float | None = None
    seed: int | None = None
    batch_size: int = 64
    worst: int = 10
    confusions: int = 10
    # Read any length even where the model keeps to its training set's label lengths.
    any_length: bool = False
    # Shifted copies of each image read together (see captcha_ocr.predict.shifted_views).
    views: int = DEFAULT_VIEWS


@dataclass
class EvaluationData:
    """Decoded images (N, H, W) with labels and paths, and what was left out."""

    pixels: np.ndarray
    labels: list[str]
    paths: list[Path]
    found: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class Evaluation:
    """Result of :func:`run_evaluation`: the report, its printable lines and the files written."""

    evaluation_id: str
    report: dict[str, Any]
    lines: list[str]
    log_file: Path
    json_file: Path
    sheet_file: Path | None


# ----------------------------------------------------------------- the training run
def find_training_run(metadata: dict[str, Any], model_path: Path, output_dir: Path) -> Path | None:
    """Find the run folder of the session that trained the model; None when it is not on this machine."""
    session_id = metadata.get("session_id")
    if not session_id:
        return None
    candidates = [
        output_dir / "runs" / session_id,
        model_path.resolve().parent.parent / "runs" / session_id,  # outputs/models/<file>
        model_path.resolve().parent.parent,  # outputs/runs/<ID>/checkpoints/<file>
    ]
    for folder in candidates:
        if folder.name == session_id and (folder / "config.json").is_file():
            return folder
    return None


def _read_run_file(run_dir: Path | None, name: str) -> dict[str, Any]:
    if run_dir is None:
        return {}
    try:
        value = json.loads((run_dir / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


@dataclass
class ResolvedSettings:
    """The settings in force after filling the unset ones from the model and its training run."""

    ignore_case: bool
    label_pattern: str
    path_column: str | None
    label_column: str | None
    val_split: float | None
    seed: int
    explicit_charset: bool
    batch_size: int
    worst: int
    confusions: int
    any_length: bool = False


def resolve_settings(settings: EvaluationSettings, metadata: dict[str, Any], training: dict[str, Any]) -> ResolvedSettings:
    def pick(value: Any, key: str, default: Any) -> Any:
        if value is not None:
            return value
        return training[key] if training.get(key) is not None else default

    return ResolvedSettings(
        # The model file's own flag wins over the run folder, which may have been edited or replaced.
        ignore_case=bool(settings.ignore_case if settings.ignore_case is not None
                         else metadata.get("ignore_case", training.get("ignore_case", False))),
        label_pattern=pick(settings.label_pattern, "label_pattern", DEFAULT_LABEL_PATTERN),
        path_column=pick(settings.path_column, "path_column", None),
        label_column=pick(settings.label_column, "label_column", None),
        val_split=settings.val_split,
        seed=int(pick(settings.seed, "seed", 42)),
        explicit_charset=bool(training.get("charset")),
        batch_size=settings.batch_size,
        worst=settings.worst,
        confusions=settings.confusions,
        any_length=settings.any_length,
    )


# ------------------------------------------------------------------------- data
def _decode(samples: Sequence[Sample], preprocessing: Preprocessing) -> tuple[list[np.ndarray | None], list[str]]:
    """Decode each sample as training does; a failed file gives None and its reason."""

    def decode_one(sample: Sample) -> tuple[np.ndarray | None, str]:
        try:
            return load_image(sample.path, preprocessing), ""
        except ImageError as error:
            return None, str(error)
        except OSError as error:
            return None, f"cannot read file: {error.strerror or error}"

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(decode_one, samples))
    return [pixels for pixels, _ in results], [reason for _, reason in results]


def _filter_like_training(
    samples: list[Sample], alphabet: str, steps: int, explicit_charset: bool
) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Drop the labels that training drops before it splits, in the same order.

    Training drops labels outside an explicit charset and labels too long for
    the model's output steps (or stops on them, in which case none exist).
    """
    from captcha_ocr.charset import Codec, min_ctc_steps

    codec = Codec(alphabet)
    kept: list[Sample] = []
    skipped: list[tuple[Path, str]] = []
    for sample in samples:
        unknown = codec.unknown_chars(sample.label)
        if explicit_charset and unknown:
            skipped.append((sample.path, f"label {sample.label!r} has characters outside the charset: {unknown!r}"))
        elif min_ctc_steps(sample.label) > steps:
            skipped.append((sample.path, f"label {sample.label!r} needs more than the model's {steps} output steps"))
        else:
            kept.append(sample)
    return kept, skipped


def load_evaluation_data(
    sources: Sequence[str | Path],
    preprocessing: Preprocessing,
    alphabet: str,
    resolved: ResolvedSettings,
    steps_per_column: int = 1,
) -> EvaluationData:
    """Collect and decode the images; with ``val_split`` keep only the held-out part.

    ``steps_per_column`` is the model's setting, which decides which labels
    training dropped as too long before it split.
    """
    collected = collect(
        sources, label_pattern=resolved.label_pattern, ignore_case=resolved.ignore_case,
        path_column=resolved.path_column, label_column=resolved.label_column,
    )
    skipped = list(collected.skipped)
    found = len(collected.samples) + len(collected.skipped)
    samples = collected.samples
    if resolved.val_split is not None:
        from captcha_ocr.model import output_steps

        steps = output_steps(preprocessing.width, steps_per_column)
        samples, dropped = _filter_like_training(samples, alphabet, steps, resolved.explicit_charset)
        skipped += dropped

    decoded, reasons = _decode(samples, preprocessing)
    usable = [i for i, pixels in enumerate(decoded) if pixels is not None]
    skipped += [(samples[i].path, reasons[i]) for i, pixels in enumerate(decoded) if pixels is None]
    if resolved.val_split is not None:
        from captcha_ocr.data.dataset import split_indices

        if len(usable) < 2:
            raise EvaluationError(f"cannot split {len(usable)} usable images: --val-split needs at least 2")
        _, val_index = split_indices(len(usable), resolved.val_split, resolved.seed)
        usable = [usable[i] for i in val_index]

    height, width = preprocessing.height, preprocessing.width
    pixels = np.stack([decoded[i] for i in usable]) if usable else np.zeros((0, height, width), dtype=np.uint8)
    return EvaluationData(pixels, [samples[i].label for i in usable], [samples[i].path for i in usable], found, skipped)


def file_list_hash(paths: Sequence[Path]) -> str:
    """SHA-256 of the sorted paths: the digest ``data.json`` records for each split."""
    digest = hashlib.sha256()
    for path in sorted(str(p) for p in paths):
        digest.update(path.encode("utf-8") + b"\n")
    return digest.hexdigest()


# ---------------------------------------------------------------------- scoring
def score(
    labels: Sequence[str],
    predictions: Sequence[str],
    confidences: Sequence[float],
    paths: Sequence[Path | str] | None = None,
    worst: int = 10,
    top_confusions: int = 10,
) -> dict[str, Any]:
    """Score predictions against true labels; the results part of the report.

    Mistakes are ordered worst first: the largest edit distance, then the
    lowest confidence. Each mistake keeps its ``index`` into the inputs.
    """
    count = len(labels)
    right = [label == prediction for label, prediction in zip(labels, predictions, strict=True)]
    errors, characters = character_errors(labels, predictions)

    by_length: dict[int, list[int]] = {}
    for label, ok in zip(labels, right, strict=True):
        totals = by_length.setdefault(len(label), [0, 0])
        totals[0] += 1
        totals[1] += ok

    mistakes = [
        {
            "index": i,
            "path": str(paths[i]) if paths is not None else None,
            "label": labels[i],
            "prediction": predictions[i],
            "confidence": float(confidences[i]),
            "edit_distance": edit_distance(labels[i], predictions[i]),
        }
        for i in range(count) if not right[i]
    ]
    mistakes.sort(key=lambda m: (-m["edit_distance"], m["confidence"], m["index"]))
    pairs = confusion_pairs(labels, predictions)
    correct = sum(right)
    return {
        "count": count,
        "correct": correct,
        "accuracy": correct / count if count else 0.0,
        "character_errors": errors,
        "characters": characters,
        "cer": errors / characters if characters else 0.0,
        "by_length": {
            str(length): {"count": total, "correct": ok, "accuracy": ok / total}
            for length, (total, ok) in sorted(by_length.items())
        },
        "confusions": [
            {"true": true, "predicted": predicted, "count": n}
            for (true, predicted), n in sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:top_confusions]
        ],
        "mean_confidence_correct": _mean([c for c, ok in zip(confidences, right, strict=True) if ok]),
        "mean_confidence_wrong": _mean([c for c, ok in zip(confidences, right, strict=True) if not ok]),
        "mistakes": mistakes,
        "worst_mistakes": mistakes[:worst],
    }


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def predict_all(recognizer: Any, pixels: np.ndarray, batch_size: int) -> tuple[list[str], list[float], float]:
    """Read every image; returns texts, confidences and the seconds spent in the model."""
    texts: list[str] = []
    confidences: list[float] = []
    seconds = 0.0
    if len(pixels):
        recognizer.predict_pixels(pixels[:1])  # keeps one-off setup costs out of the measured speed
    for start in range(0, len(pixels), batch_size):
        began = time.perf_counter()
        predictions = recognizer.predict_pixels(pixels[start : start + batch_size])
        seconds += time.perf_counter() - began
        texts += [p.text for p in predictions]
        confidences += [p.confidence for p in predictions]
    return texts, confidences, seconds


# --------------------------------------------------------------------- the report
def _percent(value: float) -> str:
    return f"{value:.4f} ({value * 100:.1f}%)"


def _char(text: str) -> str:
    return repr(text) if text else "(none)"


def format_report(report_data: dict[str, Any]) -> list[str]:
    """Format the report as readable lines for the console and the log."""
    model, data, results = report_data["model"], report_data["data"], report_data["results"]
    settings = report_data["settings"]
    origin = ", ".join(part for part in (
        model["format"],
        f"run {model['session_id']}" if model.get("session_id") else "",
        f"epoch {model['epoch']}" if model.get("epoch") else "",
    ) if part)
    lines = [f"Model: {model['path']} ({origin})"]
    lines.append(f"Data: {', '.join(data['sources'])}: {data['found']} files found, {data['skipped']} skipped")
    if data["held_out"]:
        lines.append(
            f"Held-out part (--val-split {data['held_out']['val_split']} --seed {data['held_out']['seed']}): "
            f"{results['count']} images"
        )
    else:
        lines.append(f"Evaluated: {results['count']} images")
    lines.append("Case: " + ("folded to lower case" if settings["ignore_case"] else "compared exactly"))
    lengths = model.get("label_lengths")
    lines.append("Reading lengths: " + (f"{', '.join(map(str, lengths))} characters" if lengths else "any"))
    if model.get("views"):
        lines.append(f"Views per image: {model['views']}" + (" (the image as it is)" if model["views"] == 1 else ""))
    if model.get("members", 1) > 1:
        lines.append(f"Members: {model['members']} networks, each reading every view")
    if data.get("unknown_characters"):
        lines.append(f"Labels with characters the model cannot emit: {data['unknown_characters']!r}")
    if data.get("unread_lengths"):
        unread = ", ".join(map(str, data["unread_lengths"]))
        lines.append(f"Labels of lengths the model does not read: {unread} characters (--any-length reads them)")

    lines.append(f"Accuracy: {_percent(results['accuracy'])}, {results['correct']} of {results['count']} labels read exactly")
    lines.append(
        f"Character error rate: {results['cer']:.4f} "
        f"({results['character_errors']} edits over {results['characters']} characters)"
    )
    lines.append("Accuracy by label length:")
    for length, row in results["by_length"].items():
        lines.append(f"   {length} characters: {_percent(row['accuracy'])}, {row['correct']} of {row['count']}")
    if results["confusions"]:
        lines.append("Most confused characters (true -> read, count):")
        for pair in results["confusions"]:
            lines.append(f"   {_char(pair['true'])} -> {_char(pair['predicted'])}: {pair['count']}")
    right, wrong = results["mean_confidence_correct"], results["mean_confidence_wrong"]
    lines.append(
        "Mean confidence: "
        + (f"{right:.3f} when right" if right is not None else "none right")
        + ", "
        + (f"{wrong:.3f} when wrong" if wrong is not None else "none wrong")
    )
    lines.append(
        f"Speed: {results['images_per_second']:.1f} images per second in the model "
        f"({results['count']} images in {results['model_seconds']:.2f}s; decoding took {results['decode_seconds']:.2f}s)"
    )
    if results["worst_mistakes"]:
        lines.append("Worst mistakes (largest edit distance, then lowest confidence):")
        for m in results["worst_mistakes"]:
            name = Path(m["path"]).name if m.get("path") else f"#{m['index']}"
            lines.append(
                f"   {name}: true {m['label']!r}, read {m['prediction']!r}, "
                f"confidence {m['confidence']:.3f}, {m['edit_distance']} edits"
            )
    lines += _reference_lines(report_data.get("reference"))
    return lines


def _reference_lines(reference: dict[str, Any] | None) -> list[str]:
    if not reference:
        return []
    match = reference.get("same_files_as_validation")
    if match is None:
        return [f"Training run: {reference['run_dir']}"]
    if not match:
        sources = reference.get("sources") or []
        training_data = f" ({' '.join(sources)})" if sources else ""
        split = reference.get("split_options") or "the same --val-split and --seed"
        return [
            f"Training run {reference['session_id']}: these files differ from its validation set "
            f"(to compare, give DATA as it was given to train{training_data}, with {split})"
        ]
    line = f"Training run {reference['session_id']}: same files as its validation set"
    if reference.get("val_accuracy") is not None:
        line += (
            f"; this model's epoch {reference['epoch']} scored {_percent(reference['val_accuracy'])}, "
            f"CER {reference['val_cer']:.4f} there"
        )
    return [line]


# ---------------------------------------------------------------------- the entry
def _reference(run_dir: Path | None, metadata: dict[str, Any], paths: Sequence[Path]) -> dict[str, Any] | None:
    if run_dir is None:
        return None
    described = _read_run_file(run_dir, "data.json")
    val = described.get("val", {})
    recorded = val.get("file_list_sha256")
    metrics = metadata.get("metrics") or {}
    trained = _read_run_file(run_dir, "config.json").get("config") or {}
    split_options = None
    if isinstance(trained, dict) and "val_split" in trained and "seed" in trained:
        split_options = f"--val-split {trained['val_split']} --seed {trained['seed']}"
    return {
        "session_id": metadata.get("session_id"),
        "run_dir": str(run_dir),
        "sources": [str(source) for source in described.get("sources", [])],
        "split_options": split_options,
        "same_files_as_validation": (file_list_hash(paths) == recorded) if recorded else None,
        "epoch": metrics.get("epoch", metadata.get("epoch")),
        "val_accuracy": metrics.get("val_accuracy"),
        "val_cer": metrics.get("val_cer"),
    }


def _model_part(recognizer: Any, model_path: Path) -> dict[str, Any]:
    metadata = recognizer.metadata
    return {
        "path": str(model_path),
        "format": metadata.get("format", "pytorch"),
        "session_id": metadata.get("session_id"),
        "epoch": metadata.get("epoch"),
        "alphabet": recognizer.codec.alphabet,
        "preprocessing": recognizer.preprocessing.to_dict(),
        "trained_ignore_case": bool(metadata.get("ignore_case", False)),
        "label_lengths": recognizer.label_lengths,
        "views": recognizer.views,
        "members": recognizer.members,
    }


def evaluate(
    recognizer: Any,
    sources: Sequence[str | Path],
    settings: EvaluationSettings,
    model_path: Path,
    output_dir: Path = Path("outputs"),
) -> tuple[dict[str, Any], EvaluationData]:
    """Collect, read and score the images; returns the report and the data it scored."""
    run_dir = find_training_run(recognizer.metadata, model_path, output_dir)
    training = _read_run_file(run_dir, "config.json").get("config", {})
    resolved = resolve_settings(settings, recognizer.metadata, training)
    if run_dir is not None:
        logger.info("Training run found: %s (its label rule, case folding and seed are the defaults)", run_dir)

    began = time.perf_counter()
    model_config = recognizer.metadata.get("model_config") or {}
    steps_per_column = model_config.get("steps_per_column", 1)
    data = load_evaluation_data(sources, recognizer.preprocessing, recognizer.codec.alphabet, resolved, steps_per_column)
    decode_seconds = time.perf_counter() - began
    for path, reason in data.skipped:
        logger.warning("Skipped %s: %s", path, reason)
    if not data.labels:
        raise EvaluationError(
            f"no usable images in {', '.join(str(s) for s in sources)}: {data.found} files found, "
            f"{len(data.skipped)} skipped (see the warnings above)"
        )

    texts, confidences, model_seconds = predict_all(recognizer, data.pixels, resolved.batch_size)
    if resolved.ignore_case:  # the labels were folded when they were collected
        texts = [text.lower() for text in texts]
    labels = data.labels
    results = score(labels, texts, confidences, data.paths, resolved.worst, resolved.confusions)
    results.update(
        images_per_second=len(labels) / model_seconds if model_seconds > 0 else 0.0,
        model_seconds=model_seconds,
        decode_seconds=decode_seconds,
    )
    unknown = sorted({c for label in labels for c in recognizer.codec.unknown_chars(label)})
    allowed = recognizer.label_lengths
    unread_lengths = sorted({len(label) for label in labels} - set(allowed)) if allowed else []
    report_data = {
        "model": _model_part(recognizer, model_path),
        "data": {
            "sources": [str(s) for s in sources],
            "found": data.found,
            "skipped": len(data.skipped),
            "skipped_files": [{"path": str(p), "reason": r} for p, r in data.skipped],
            "held_out": {"val_split": resolved.val_split, "seed": resolved.seed} if resolved.val_split is not None else None,
            "file_list_sha256": file_list_hash(data.paths),
            "unknown_characters": "".join(unknown),
            # Label lengths the model does not read, because it keeps to its training set's lengths.
            "unread_lengths": unread_lengths,
        },
        "settings": asdict(resolved),
        "results": results,
        "reference": _reference(run_dir, recognizer.metadata, data.paths),
        "predictions": [
            {"path": str(p), "label": label, "prediction": text, "confidence": confidence}
            for p, label, text, confidence in zip(data.paths, labels, texts, confidences, strict=True)
        ],
    }
    return report_data, data


def run_evaluation(
    model: str | Path,
    sources: Sequence[str | Path],
    settings: EvaluationSettings | None = None,
    output_dir: str | Path = "outputs",
    json_path: str | Path | None = None,
    sheet_path: str | Path | None = None,
    device: str | None = None,
    console: bool = True,
) -> Evaluation:
    """Evaluate ``model`` on ``sources`` and write the log, the JSON report and the optional sheet.

    The log is ``<output_dir>/logs/evaluation_<ID>.log``; the JSON report goes to
    ``json_path`` or ``<output_dir>/evaluations/evaluation_<ID>.json``. On the
    console only warnings appear; the caller prints :attr:`Evaluation.lines`.
    """
    from captcha_ocr.predict import Recognizer

    settings = settings or EvaluationSettings()
    output_dir = Path(output_dir)
    evaluation_id = new_log_id(output_dir / "logs", "evaluation")
    log_file = output_dir / "logs" / f"evaluation_{evaluation_id}.log"
    package_logger = setup_logging(log_file, console=console)
    for handler in package_logger.handlers:
        if isinstance(handler, ConsoleHandler):
            handler.setLevel(logging.WARNING)
    try:
        report.banner(logger, "CAPTCHA MODEL EVALUATION")
        logger.info("Evaluation ID: %s", evaluation_id)
        logger.info("Log file: %s", log_file)
        logger.info("Command: %s", " ".join(sys.argv))
        model_path = Path(model)
        recognizer = Recognizer.load(model_path, device=device, any_length=settings.any_length, views=settings.views)
        report_data, data = evaluate(recognizer, sources, settings, model_path, output_dir)
        report_data = {"evaluation_id": evaluation_id, "created_at": datetime.now().isoformat(timespec="seconds"), **report_data}
        lines = format_report(report_data)
        for line in lines:
            logger.info("%s", line)

        sheet_file = _write_sheet(Path(sheet_path), data, report_data) if sheet_path else None
        json_file = Path(json_path) if json_path else output_dir / "evaluations" / f"evaluation_{evaluation_id}.json"
        report_data["log_file"] = str(log_file)
        report_data["sheet"] = str(sheet_file) if sheet_file else None
        json_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(json_file, report_data)
        saved = [f"Report saved to: {json_file}", f"Log saved to: {log_file}"]
        if sheet_file:
            saved.insert(1, f"Misread images drawn in: {sheet_file}")
        for line in saved:
            logger.info("%s", line)
        return Evaluation(evaluation_id, report_data, lines + saved, log_file, json_file, sheet_file)
    except Exception as error:
        logger.error("EVALUATION FAILED: %s", error)
        raise
    finally:
        remove_handlers(get_package_logger())


def _write_sheet(path: Path, data: EvaluationData, report_data: dict[str, Any]) -> Path | None:
    results = report_data["results"]
    mistakes = results["mistakes"][:SHEET_LIMIT]
    if not mistakes:
        logger.info("No misread images: no contact sheet written")
        return None
    partial_note = f", the worst {len(mistakes)} shown" if len(mistakes) < len(results["mistakes"]) else ""
    title = f"Misread {len(results['mistakes'])} of {results['count']} images{partial_note} (true label, reading, confidence)"
    image = mistakes_sheet([data.pixels[m["index"]] for m in mistakes], mistakes, title)
    return save_png(image, path)
