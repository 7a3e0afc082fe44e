"""The training log's sections and lines, worded so the documented greps find them.

Each function writes one section from plain values. The phrases that users grep
for are fixed: ``Accuracy`` in each epoch line, ``Learning rate reduced``,
``TRAINING SUMMARY`` and ``Final accuracy``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

RULE = "=" * 60


def banner(logger: logging.Logger, title: str, level: int = logging.INFO) -> None:
    logger.log(level, RULE)
    logger.log(level, title)
    logger.log(level, RULE)


def log_session_start(logger: logging.Logger, session_id: str, run_dir: str, log_file: str, resumed: bool) -> None:
    if resumed:
        banner(logger, "TRAINING RESUMED")
    else:
        banner(logger, "CAPTCHA RECOGNITION TRAINING SESSION STARTED")
    logger.info("Session ID: %s", session_id)
    logger.info("Run folder: %s", run_dir)
    logger.info("Log file: %s", log_file)


def log_system_info(logger: logging.Logger, system: Mapping[str, Any]) -> None:
    """Write the versions, device and process layout."""
    logger.info("PyTorch Version: %s", system["torch"])
    logger.info("Python Version: %s", system["python"])
    logger.info("Device: %s", system["device"])
    for line in system.get("cuda_lines", []):
        logger.info("%s", line)
    logger.info("CPU threads per process: %s", system["threads"])
    logger.info("World size: %d (backend: %s)", system["world_size"], system["backend"] or "none, single process")
    for rank, device in enumerate(system.get("rank_devices", [])):
        logger.info("   Rank %d device: %s", rank, device)


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]" if value else "[]"
    return str(value)


def log_configuration(logger: logging.Logger, config: Mapping[str, Any]) -> None:
    logger.info("Configuration:")
    for key, value in config.items():
        title = key.replace("_", " ").title()
        logger.info("  - %s: %s", title, _format_value(value))


def log_charset(logger: logging.Logger, alphabet: str) -> None:
    shown = " ".join(f"'{c}'" for c in alphabet)
    logger.info("All characters used in label encoding: [%s]", shown)
    logger.info("Character count: %d (+1 CTC blank)", len(alphabet))


def log_data(
    logger: logging.Logger,
    sources: Sequence[str],
    found: int,
    skipped_by_reason: Mapping[str, int],
    skipped_file: str | None,
) -> None:
    logger.info("DATA:")
    for source in sources:
        logger.info("   Source: %s", source)
    logger.info("   Images found: %d", found)
    total_skipped = sum(skipped_by_reason.values())
    logger.info("   Images skipped: %d", total_skipped)
    for reason, count in sorted(skipped_by_reason.items(), key=lambda item: -item[1]):
        logger.info("      %d x %s", count, reason)
    if skipped_file:
        logger.info("   Skipped files listed in: %s", skipped_file)


def log_split(logger: logging.Logger, train_count: int, val_count: int, from_split: bool) -> None:
    total = train_count + val_count
    logger.info("TRAIN/TEST SPLIT:")
    logger.info("   Training images: %d", train_count)
    logger.info("   Testing images:  %d", val_count)
    how = "random split with the seed" if from_split else "separate validation data"
    logger.info("   Ratio: %.1f%% / %.1f%% (%s)", 100 * train_count / total, 100 * val_count / total, how)


def log_model(
    logger: logging.Logger,
    num_alphabet: int,
    parameters: int,
    steps: int,
    model_config: Mapping[str, Any],
    coarse_until: float | None = None,
) -> None:
    logger.info("Model created with %d character classes", num_alphabet)
    logger.info("Model: CRNN (CNN + bidirectional LSTM + CTC), %s", _format_model(model_config))
    logger.info("Model parameters: %s", f"{parameters:,}")
    logger.info("Model output steps per image: %d", steps)
    if coarse_until is not None:
        coarse = steps // model_config["steps_per_column"]
        logger.info("Training starts on the coarse head (%d steps) until validation accuracy reaches %.2f", coarse, coarse_until)


def _format_model(model_config: Mapping[str, Any]) -> str:
    return (
        f"input 1x{model_config['height']}x{model_config['width']}, "
        f"channels {list(model_config['channels'])}, "
        f"LSTM {model_config['rnn_layers']}x{model_config['rnn_hidden']}"
        + (f", {model_config['members']} members trained side by side" if model_config.get("members", 1) > 1 else "")
    )


def log_optimizer(logger: logging.Logger, lr: float, weight_decay: float, factor: float, patience: int, warmup: int, batch: str) -> None:
    logger.info("Optimizer: Adam (lr=%s, weight_decay=%s)", _short_float(lr), _short_float(weight_decay))
    logger.info("Scheduler: ReduceLROnPlateau (factor=%s, patience=%d) after %d warm-up steps", factor, patience, warmup)
    logger.info("Batch size: %s", batch)


def _short_float(value: float) -> str:
    text = f"{value:.0e}" if value and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:g}"
    return text.replace("e-0", "e-").replace("e+0", "e+")


def log_sample_predictions(
    logger: logging.Logger, epoch: int, epochs: int, pairs: Iterable[tuple[str, str]]
) -> None:
    logger.info("Epoch %d/%d - Sample predictions:", epoch, epochs)
    for actual, predicted in pairs:
        mark = "✓" if actual == predicted else "✗"
        logger.info("   %s '%s' → '%s'", mark, actual, predicted)


def epoch_line(epoch: int, epochs: int, metrics: Mapping[str, float]) -> str:
    accuracy = metrics["val_accuracy"]
    return (
        f"Epoch {epoch}/{epochs} - Train Loss: {metrics['train_loss']:.4f}, "
        f"Val Loss: {metrics['val_loss']:.4f}, "
        f"Accuracy: {accuracy:.4f} ({accuracy * 100:.1f}%), "
        f"CER: {metrics['val_cer']:.4f}, "
        f"Time: {metrics['epoch_time']:.1f}s, LR: {metrics['lr']:.2e}"
    )


def log_lr_reduced(logger: logging.Logger, old: float, new: float, cause: str = "") -> None:
    if cause:
        logger.info("Learning rate reduced: %.2e → %.2e (%s)", old, new, cause)
    else:
        logger.info("Learning rate reduced: %.2e → %.2e", old, new)


def log_final_decay(logger: logging.Logger, lr: float, min_lr: float, fraction: float, epoch: int) -> None:
    logger.info(
        "Final learning-rate decay: %.2e → %.2e linearly over the last %.0f%% of training, from epoch %d",
        lr, min_lr, 100 * fraction, epoch,
    )


def log_fine_head(logger: logging.Logger, coarse_steps: int, fine_steps: int, accuracy: float) -> None:
    logger.info(
        "Output head switched: coarse (%d steps) → fine (%d steps) at validation accuracy %.4f; "
        "the learning-rate warm-up starts again",
        coarse_steps, fine_steps, accuracy,
    )


def log_augmentation_starts(logger: logging.Logger, accuracy: float, threshold: float) -> None:
    logger.info("Augmentation starts: validation accuracy %.4f reached %.4f", accuracy, threshold)


def log_saved(logger: logging.Logger, what: str, path: str) -> None:
    logger.info("✅ %s saved to: %s", what, path)


def log_summary(logger: logging.Logger, summary: Mapping[str, Any]) -> None:
    """Write the closing summary; ``summary`` contains the keys read below."""
    logger.info("TRAINING SUMMARY:")
    final = summary.get("final")
    best = summary.get("best")
    if final:
        accuracy = final["val_accuracy"]
        logger.info("   • Final accuracy: %.4f (%.1f%%)", accuracy, accuracy * 100)
        logger.info("   • Final character error rate: %.4f", final["val_cer"])
        logger.info("   • Final train loss: %.4f, final val loss: %.4f", final["train_loss"], final["val_loss"])
    else:
        logger.info("   • Final accuracy: none (no epoch completed)")
    if best:
        logger.info(
            "   • Best accuracy: %.4f (%.1f%%) at epoch %d",
            best["val_accuracy"], best["val_accuracy"] * 100, best["epoch"],
        )
    logger.info("   • Epochs completed: %d", summary["epochs_completed"])
    logger.info("   • Stop reason: %s", summary["stop_reason"])
    logger.info("   • Training samples: %d, validation samples: %d", summary["train_count"], summary["val_count"])
    logger.info("   • Character classes: %d", summary["classes"])
    logger.info("   • Total time: %.1fs", summary["total_time"])
    logger.info("   • Session ID: %s", summary["session_id"])
    logger.info("   • Log file: %s", summary["log_file"])
