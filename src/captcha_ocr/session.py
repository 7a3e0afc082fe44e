"""One training session end to end: log, run folder, data, model, loop, final model.

:func:`train` is the top-level entry point used by the CLI and the Python API.
It ties the record (log and run folder), the data, the model and the loop
together, and makes sure the log and ``summary.json`` tell how the session ended,
whether it completed, failed or was interrupted.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from captcha_ocr.checkpoint import CheckpointError, load_checkpoint, save_atomic
from captcha_ocr.config import AUTO_BATCH_RULE, ConfigError, TrainConfig
from captcha_ocr.data.images import Preprocessing
from captcha_ocr.data.prepare import (
    DataError,
    PreparedData,
    describe_data,
    prepare_data,
    skipped_by_reason,
)
from captcha_ocr.data.sources import SourceError
from captcha_ocr.model import (
    FINE_STEPS_PER_COLUMN,
    ModelConfig,
    build_model,
    count_parameters,
    output_steps,
)
from captcha_ocr.record import report
from captcha_ocr.record.log import (
    get_package_logger,
    new_session_id,
    remove_handlers,
    setup_logging,
)
from captcha_ocr.record.run import RunFolder, collect_environment, read_json
from captcha_ocr.record.runs import resolve_run_id  # noqa: F401 - part of this module's API
from captcha_ocr.record.sheets import write_epoch_samples
from captcha_ocr.record.tensorboard_scalars import TensorBoardScalars, open_tensorboard
from captcha_ocr.training.distributed import (
    DistributedContext,
    broadcast_object,
    init_distributed,
    shutdown_distributed,
)
from captcha_ocr.training.loop import Trainer, TrainingError
from captcha_ocr.training.signals import (
    Interrupted,
    install_signal_handlers,
    restore_signal_handlers,
)

logger = logging.getLogger(__name__)

# Settings that may change when a run is resumed; the rest must stay as trained.
RESUME_OVERRIDABLE = ("epochs", "max_time", "early_stop_patience", "device", "threads", "sample_count")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


@dataclass
class TrainResult:
    session_id: str
    status: str
    exit_code: int
    log_file: Path
    run_dir: Path
    model_path: Path | None = None
    final: dict[str, Any] | None = None
    best: dict[str, Any] | None = None
    stop_reason: str = ""
    error: str = ""
    artifacts: dict[str, str] = field(default_factory=dict)


class SessionPaths:
    def __init__(self, output_dir: str | Path, session_id: str) -> None:
        root = Path(output_dir)
        self.session_id = session_id
        self.logs = root / "logs"
        self.runs = root / "runs"
        self.models = root / "models"
        self.log_file = self.logs / f"training_{session_id}.log"
        self.run_dir = self.runs / session_id


def find_resume_checkpoint(reference: str, output_dir: str | Path) -> Path:
    """Find the checkpoint to resume from: a file, a run folder, a run ID, a prefix or 'latest'."""
    path = Path(reference)
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / "checkpoints" / "last.pt"
        if candidate.is_file():
            return candidate
        raise FileNotFoundError(f"{path}: no checkpoints/last.pt in this folder")
    runs_dir = Path(output_dir) / "runs"
    run_id = resolve_run_id(reference, runs_dir)
    candidate = runs_dir / run_id / "checkpoints" / "last.pt"
    if not candidate.is_file():
        raise FileNotFoundError(
            f"run {run_id} has no checkpoint to resume from ({candidate} is missing): "
            "it stopped before its first epoch completed; start a new training instead"
        )
    return candidate


def select_device(request: str, context: DistributedContext) -> torch.device:
    if request == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", context.local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(request)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {request}: CUDA is not available on this machine; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {request}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {request}: Apple MPS is not available on this machine; use --device cpu or auto")
    if device.type == "cuda" and context.enabled and device.index is None:
        device = torch.device("cuda", context.local_rank)
    return device


def _check_precision(config: TrainConfig, device: torch.device) -> None:
    if config.precision != "fp32" and device.type != "cuda":
        raise ConfigError(
            f"--precision {config.precision} is mixed precision for CUDA GPUs and does not apply on {device}; "
            "use --precision fp32 on the CPU"
        )
    if config.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16")


def _preflight(config: TrainConfig, context: DistributedContext) -> None:
    """Check what can be checked before a session ID, log file or run folder exists.

    A typo in a path or an unusable device then ends with one line and leaves no
    failed run behind.
    """
    device = select_device(config.device, context)
    _check_precision(config, device)
    for source in [*config.data, *config.val]:
        if not Path(source).exists():
            raise SourceError(f"{source}: data source not found; give a folder of images or a manifest file")


def _system_info(device: torch.device, context: DistributedContext) -> dict[str, Any]:
    cuda_lines = []
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        cuda_lines = [
            f"CUDA Version: {torch.version.cuda}",
            f"cuDNN Version: {torch.backends.cudnn.version()}",
            f"GPU: {properties.name} ({properties.total_memory / 2**30:.1f} GiB)",
            f"GPU count: {torch.cuda.device_count()}",
        ]
    rank_devices = [str(device)]
    if context.enabled:
        gathered: list[Any] = [None] * context.world_size
        torch.distributed.all_gather_object(gathered, f"{platform.node()}/{device}")
        rank_devices = [str(d) for d in gathered]
    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "device": str(device),
        "cuda_lines": cuda_lines,
        "threads": torch.get_num_threads(),
        "world_size": context.world_size,
        "backend": context.backend,
        "rank_devices": rank_devices if context.enabled else [],
    }


def _set_threads(config: TrainConfig, context: DistributedContext) -> None:
    if config.threads:
        torch.set_num_threads(config.threads)
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", context.world_size if context.enabled else 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))


def _model_config(config: TrainConfig, num_classes: int) -> ModelConfig:
    return ModelConfig(
        num_classes=num_classes, height=config.height, width=config.width, channels=tuple(config.channels),
        rnn_hidden=config.rnn_hidden, rnn_layers=config.rnn_layers, dropout=config.dropout, members=config.members,
    )


def train(
    config: TrainConfig,
    resume: str | None = None,
    overrides: dict[str, Any] | None = None,
    argv: list[str] | None = None,
    console: bool = True,
    progress: bool | None = None,
) -> TrainResult:
    """Run one training session (or resume one) and return how it ended.

    Errors in the data or configuration found before training are logged as
    ``TRAINING FAILED`` with a one-line reason and exit code 2; other errors are
    logged with their traceback and exit code 1; SIGINT and SIGTERM end the
    session as ``TRAINING INTERRUPTED`` with exit codes 130 and 143.
    """
    context = init_distributed(config.device)
    try:
        return _train(config, resume, overrides or {}, argv, console, progress, context)
    finally:
        shutdown_distributed(context)


def _train(
    config: TrainConfig,
    resume: str | None,
    overrides: dict[str, Any],
    argv: list[str] | None,
    console: bool,
    progress: bool | None,
    context: DistributedContext,
) -> TrainResult:
    payload = None
    ignored: list[str] = []
    if resume is not None and not resume.strip():
        raise ConfigError("--resume needs a run ID, a unique ID prefix, 'latest', a run folder or a checkpoint file")
    if resume:
        checkpoint_path = find_resume_checkpoint(resume, config.output_dir)
        payload = load_checkpoint(checkpoint_path)
        if payload.get("kind") != "training":
            raise CheckpointError(f"{checkpoint_path}: a model file, not a training checkpoint; resume from a run ID")
        saved = dict(payload["train_config"])
        # Checkpoints saved before the presence loss and the reading-length rule existed trained without them.
        saved.setdefault("presence_weight", 0.0)
        saved.setdefault("keep_lengths", False)
        ignored = [
            key for key, value in overrides.items()
            if key not in RESUME_OVERRIDABLE and key != "output_dir" and saved.get(key) != value
        ]
        saved.update({k: v for k, v in overrides.items() if k in RESUME_OVERRIDABLE})
        saved["output_dir"] = config.output_dir
        config = TrainConfig.build(saved)
        _preflight(config, context)
        session_id = payload["session_id"]
    else:
        _preflight(config, context)
        session_id = None
        if context.is_main:
            root = Path(config.output_dir)
            session_id = new_session_id(root / "logs", root / "runs")
        session_id = broadcast_object(session_id, context)

    paths = SessionPaths(config.output_dir, session_id)
    setup_logging(paths.log_file, console=console, rank=context.rank)
    run = RunFolder(paths.run_dir) if context.is_main else None
    show_progress = progress if progress is not None else (context.is_main and sys.stderr.isatty())
    result = TrainResult(session_id, "running", EXIT_OK, paths.log_file, paths.run_dir)
    started = time.monotonic()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S")
    trainer: Trainer | None = None
    prepared: PreparedData | None = None
    previous_handlers = install_signal_handlers(raise_at_once=not context.enabled)
    try:
        if context.is_main:
            report.log_session_start(logger, session_id, str(paths.run_dir), str(paths.log_file), resumed=payload is not None)
            if payload is not None:
                logger.info("Resuming from %s after epoch %d", checkpoint_path, payload["epoch"])
            if ignored:
                logger.warning(
                    "Ignored on resume, the run keeps the values it was trained with: %s (only %s can change)",
                    ", ".join(_flag(name, overrides[name]) for name in ignored), _flags(RESUME_OVERRIDABLE),
                )
        trainer, prepared = _setup(config, payload, context, paths, run, argv, show_progress)
        if run is not None:
            _write_summary(run, result, config, prepared, trainer, started, started_at, status="running")
        trainer.fit()
        if context.is_main:
            _finish(trainer, prepared, paths, result, started)
        result.status = "completed"
    except Interrupted as interrupt:
        _record_interrupt(result, trainer, paths, interrupt.signum, interrupt.exit_code, context)
    except KeyboardInterrupt:
        _record_interrupt(result, trainer, paths, 2, 130, context)
    except (DataError, SourceError, ConfigError, CheckpointError) as error:
        # Every rank finds the same problem in the same input, so only rank 0 reports it.
        result.status, result.exit_code, result.error = "failed", EXIT_BAD_INPUT, str(error)
        if run is not None and isinstance(error, DataError):
            run.write_skipped(error.skipped)
        if context.is_main:
            logger.error("%s", error)
            _log_failed(trainer, paths)
    except TrainingError as error:
        result.status, result.exit_code, result.error = "failed", EXIT_FAILED, str(error)
        if context.is_main:
            logger.error("%s", error)
            _log_failed(trainer, paths)
    except Exception as error:  # noqa: BLE001 - every crash must reach the log before exiting
        result.status, result.exit_code = "failed", EXIT_FAILED
        result.error = f"{type(error).__name__}: {error}"
        logger.exception("Uncaught error during training: %s", result.error)
        _log_failed(trainer, paths)
    finally:
        restore_signal_handlers(previous_handlers)
        if run is not None:
            _write_summary(run, result, config, prepared, trainer, started, started_at, status=result.status)
        remove_handlers(get_package_logger())
    return result


def _setup(
    config: TrainConfig,
    payload: dict[str, Any] | None,
    context: DistributedContext,
    paths: SessionPaths,
    run: RunFolder | None,
    argv: list[str] | None,
    progress: bool,
) -> tuple[Trainer, PreparedData]:
    device = select_device(config.device, context)
    _check_precision(config, device)
    _set_threads(config, context)
    torch.manual_seed(config.seed)
    system = _system_info(device, context)
    preprocessing = Preprocessing(height=config.height, width=config.width, max_pixels=config.max_pixels)
    saved_model = ModelConfig.from_dict(payload["model_config"]) if payload else None
    steps = output_steps(config.width, saved_model.steps_per_column if saved_model else FINE_STEPS_PER_COLUMN)

    if context.is_main:
        report.log_system_info(logger, system)
        logged_config = config.to_dict()
        if not config.batch_size:
            logged_config["batch_size"] = f"auto ({AUTO_BATCH_RULE})"
        report.log_configuration(logger, logged_config)
        if run is not None:
            run.write("config.json", {"config": config.to_dict(), "command": argv or sys.argv, "resumed_from": payload is not None})
            run.write("environment.json", collect_environment(config.seed, {"device": str(device), "world_size": context.world_size, "backend": context.backend, "rank_devices": system["rank_devices"]}))

    alphabet = payload["alphabet"] if payload else None
    prepared = prepare_data(config, steps, preprocessing, alphabet=alphabet, progress=progress, warn=context.is_main)
    skipped_file = None
    if context.is_main:
        if run is not None:
            skipped_file = str(run.write_skipped(prepared.skipped))
            run.write("data.json", describe_data(prepared))
        report.log_data(logger, prepared.sources + prepared.val_sources, prepared.found, skipped_by_reason(prepared.skipped), skipped_file)
        report.log_charset(logger, prepared.codec.alphabet)
        if prepared.val_unknown_chars:
            logger.warning(
                "Validation labels use characters the training labels lack (%r): those images cannot be read correctly",
                prepared.val_unknown_chars,
            )
        report.log_split(logger, len(prepared.train), len(prepared.val), prepared.from_split)

    # A resumed session rebuilds the saved architecture, which may predate the fine head.
    model_config = saved_model or _model_config(config, prepared.codec.num_classes)
    model = build_model(model_config)
    augment_enabled = config.augments(len(prepared.train))
    # The trainer, and so every checkpoint, keeps the batch size chosen here, so a resumed run keeps it too.
    chosen_batch = not config.batch_size
    config = replace(config, batch_size=config.batch_size_for(len(prepared.train)))
    model_info = {
        "model_config": model_config.to_dict(),
        "alphabet": prepared.codec.alphabet,
        "preprocessing": preprocessing.to_dict(),
        "ignore_case": config.ignore_case,
        "session_id": paths.session_id,
        # Readings keep to these lengths. None reads any length.
        "label_lengths": sorted({len(label) for label in prepared.train.labels}) if config.keep_lengths else None,
    }
    board = open_tensorboard(run.path / "tensorboard") if run is not None and config.tensorboard else None
    trainer = Trainer(
        model=model, codec=prepared.codec, preprocessing=preprocessing, config=config,
        train_set=prepared.train, val_set=prepared.val, device=device, context=context,
        checkpoint_dir=run.checkpoints if run is not None else None, model_info=model_info,
        augment_enabled=augment_enabled,
        # The callback first runs after this assignment, so it can read the trainer's validation pixels.
        on_epoch=(lambda row: _on_epoch(run, row, trainer, board)) if run is not None else None,
        progress=progress,
    )
    if context.is_main:
        report.log_model(
            logger, len(prepared.codec.alphabet), count_parameters(model), steps, model_config.to_dict(),
            coarse_until=None if trainer.model.fine_active or not trainer.model.has_fine_head else config.fine_head_at,
        )
        processes = "process" if context.world_size == 1 else "processes"
        batch = f"{config.batch_size} per process x {context.world_size} {processes} = {config.batch_size * context.world_size}"
        if chosen_batch:
            batch += f" (the default for {len(prepared.train)} training images)"
        report.log_optimizer(logger, config.lr, config.weight_decay, config.lr_factor, config.lr_patience, config.warmup_steps, batch)
        if not augment_enabled:
            logger.info("Augmentation: off")
        elif config.augment_from <= 0:
            logger.info("Augmentation: on")
        else:
            logger.info("Augmentation: on, from validation accuracy %.4f", config.augment_from)
        if config.ema_decay > 0:
            logger.info("Weight average: exponential moving average, decay %s per step (validation and saved models use it)", config.ema_decay)
        else:
            logger.info("Weight average: off")
        if config.presence_weight > 0:
            logger.info("Character-presence loss: weight %s, on the coarse head", config.presence_weight)
        else:
            logger.info("Character-presence loss: off")
        if model_info["label_lengths"]:
            lengths_text = ", ".join(str(n) for n in model_info["label_lengths"])
            logger.info("Reading lengths: %s characters, the label lengths of the training set", lengths_text)
        else:
            logger.info("Reading lengths: any")
        logger.info("Precision: %s", config.precision)
    if payload is not None:
        trainer.load_payload(payload)
        trainer.last_checkpoint = paths.run_dir / "checkpoints" / "last.pt"
        if context.is_main:
            _restore_record(trainer, run, paths)
            # The lines above describe a fresh start. These give the state that the resumed run continues from.
            if trainer.model.has_fine_head:
                logger.info("Resumed output head: %s", "fine" if trainer.model.fine_active else "coarse")
            if augment_enabled:
                logger.info("Resumed augmentation: %s", "started" if trainer.state.augmenting else "not started yet")
    if context.is_main:
        report.banner(logger, "STARTING TRAINING LOOP")
    return trainer, prepared


def _on_epoch(run: RunFolder, row: dict[str, Any], trainer: Trainer, board: TensorBoardScalars | None) -> None:
    run.append_metrics({k: v for k, v in row.items() if k != "samples"})
    pixels = trainer.val_set.pixels[trainer.sample_indices]
    write_epoch_samples(run.path / "samples", row["epoch"], pixels, row["samples"])
    if board is not None:
        board.add_epoch(row)


def _restore_record(trainer: Trainer, run: RunFolder | None, paths: SessionPaths) -> None:
    """Make metrics.jsonl and the log hold each completed epoch exactly once after a resume.

    A kill can land between saving a checkpoint and writing its epoch's lines,
    so epochs the checkpoint holds but the record lacks are written again from
    the checkpoint's history, and epochs the record holds beyond the
    checkpoint are dropped from metrics.jsonl.
    """
    history = trainer.state.history
    if run is not None:
        run.rewrite_metrics(history)
    logged = set()
    if paths.log_file.is_file():
        pattern = re.compile(r"\] Epoch (\d+)/\d+ - Train Loss")
        for line in paths.log_file.read_text(encoding="utf-8", errors="replace").splitlines():
            match = pattern.search(line)
            if match:
                logged.add(int(match.group(1)))
    for row in history:
        if row["epoch"] not in logged:
            logger.info("%s (restored from the checkpoint)", report.epoch_line(row["epoch"], trainer.config.epochs, row))


def _finish(trainer: Trainer, prepared: PreparedData, paths: SessionPaths, result: TrainResult, started: float) -> None:
    best_path = paths.run_dir / "checkpoints" / "best.pt"
    best_payload = load_checkpoint(best_path)
    best_loss = best_payload.get("metrics", {}).get("val_loss", math.nan)
    if not math.isfinite(best_loss):
        raise TrainingError(
            f"no epoch reached a finite validation loss (best: {best_loss}), so no model file was written "
            "and captcha_model_latest.pth was left as it was; lower --lr or check the data"
        )
    model_payload = {k: v for k, v in best_payload.items() if k not in _TRAINING_ONLY and k not in ("format", "format_version")}
    model_payload["kind"] = "model"
    model_path = save_atomic(model_payload, paths.models / f"captcha_model_{paths.session_id}.pth")
    latest_path = save_atomic(model_payload, paths.models / "captcha_model_latest.pth")
    report.log_saved(logger, f"Model (best epoch {best_payload['epoch']})", str(model_path))
    report.log_saved(logger, "Model", str(latest_path))
    result.model_path = model_path
    result.artifacts.update(model=str(model_path), latest_model=str(latest_path))
    _fill_result_metrics(result, trainer)
    result.stop_reason = trainer.stop_reason
    logger.info("Stop reason: %s", trainer.stop_reason)
    report.banner(logger, "🎉 TRAINING COMPLETED SUCCESSFULLY!")
    report.log_summary(logger, _summary_values(result, trainer, prepared, paths, started))


_TRAINING_ONLY = (
    "optimizer_state", "scheduler_state", "scaler_state", "train_state", "rng", "train_config",
    "training_model_state", "ema_updates",
)


def _fill_result_metrics(result: TrainResult, trainer: Trainer | None) -> None:
    if trainer is None or not trainer.state.history:
        return
    result.final = dict(trainer.state.history[-1])
    best = next((r for r in trainer.state.history if r["epoch"] == trainer.state.best_epoch), None)
    result.best = dict(best) if best else None


def _summary_values(result: TrainResult, trainer: Trainer | None, prepared: PreparedData | None, paths: SessionPaths, started: float) -> dict[str, Any]:
    return {
        "final": result.final,
        "best": result.best,
        "epochs_completed": trainer.state.epoch if trainer else 0,
        "stop_reason": result.stop_reason or result.status,
        "train_count": len(prepared.train) if prepared else 0,
        "val_count": len(prepared.val) if prepared else 0,
        "classes": prepared.codec.num_classes - 1 if prepared else 0,
        "total_time": time.monotonic() - started,
        "session_id": paths.session_id,
        "log_file": str(paths.log_file),
    }


def _flag(name: str, value: Any = None) -> str:
    """Spell a setting as the flag that sets it: ``--no-keep-lengths`` for a switch given as false."""
    prefix = "--no-" if value is False else "--"
    return prefix + name.replace("_", "-")


def _flags(names: Iterable[str]) -> str:
    return ", ".join(_flag(name) for name in names)


def resume_command(session_id: str, output_dir: str, context: DistributedContext | None = None) -> str:
    """Build the shell command that continues this run, with torchrun when it ran under torchrun."""
    command = ["captcha-ocr", "train", "--resume", session_id]
    if output_dir != "outputs":
        command += ["--output-dir", output_dir]
    if context is None or not context.enabled:
        return shlex.join(command)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", context.world_size))
    launcher = ["torchrun", f"--nproc_per_node={per_node}", "-m", "captcha_ocr", *command[1:]]
    text = shlex.join(launcher)
    if per_node != context.world_size:
        text += " (on every node, with the same --nnodes and rendezvous options as before)"
    return text


def _last_checkpoint(trainer: Trainer | None, paths: SessionPaths) -> str:
    candidate = paths.run_dir / "checkpoints" / "last.pt"
    return str(candidate) if candidate.is_file() else "none (no epoch completed)"


def _record_interrupt(result: TrainResult, trainer: Trainer | None, paths: SessionPaths, signum: int, exit_code: int, context: DistributedContext) -> None:
    import signal as signal_module

    result.status, result.exit_code = "interrupted", exit_code
    _fill_result_metrics(result, trainer)
    if not context.is_main:
        return
    name = signal_module.Signals(signum).name
    epochs = trainer.state.epoch if trainer else 0
    report.banner(logger, f"TRAINING INTERRUPTED by {name} after {epochs} completed epochs", logging.WARNING)
    logger.warning("Checkpoint of the last completed epoch: %s", _last_checkpoint(trainer, paths))
    if epochs:
        logger.warning("Resume with: %s", resume_command(paths.session_id, str(paths.runs.parent), context))
    result.stop_reason = f"interrupted by {name}"


def _log_failed(trainer: Trainer | None, paths: SessionPaths) -> None:
    logger.error("TRAINING FAILED; last good checkpoint: %s", _last_checkpoint(trainer, paths))


def _write_summary(
    run: RunFolder, result: TrainResult, config: TrainConfig, prepared: PreparedData | None,
    trainer: Trainer | None, started: float, started_at: str, status: str,
) -> None:
    previous = {}
    if (run.path / "summary.json").is_file():
        try:
            previous = read_json(run.path / "summary.json")
        except ValueError:
            previous = {}
    artifacts = {
        "log_file": str(result.log_file),
        "run_dir": str(run.path),
        "config": str(run.path / "config.json"),
        "environment": str(run.path / "environment.json"),
        "data": str(run.path / "data.json"),
        "metrics": str(run.metrics_file),
        "skipped": str(run.path / "skipped.txt"),
        **{name: str(run.checkpoints / f"{name}.pt") for name in ("last", "best") if (run.checkpoints / f"{name}.pt").is_file()},
        **result.artifacts,
    }
    _fill_result_metrics(result, trainer)
    sessions = previous.get("sessions", [])
    current = {"started_at": started_at, "duration": time.monotonic() - started, "status": status}
    if sessions and sessions[-1].get("started_at") == started_at:
        sessions[-1] = current
    else:
        sessions.append(current)
    run.write("summary.json", {
        "session_id": result.session_id,
        "status": status,
        "exit_code": result.exit_code,
        "stop_reason": result.stop_reason,
        "error": result.error,
        "started_at": sessions[0]["started_at"],
        "epochs_completed": trainer.state.epoch if trainer else 0,
        "max_epochs": config.epochs,
        "final": result.final,
        "best": result.best,
        "training_seconds": trainer.state.elapsed if trainer else 0.0,
        "total_seconds": sum(s["duration"] for s in sessions),
        "sessions": sessions,
        "train_count": len(prepared.train) if prepared else 0,
        "val_count": len(prepared.val) if prepared else 0,
        "charset": prepared.codec.alphabet if prepared else None,
        "data": config.data,
        "artifacts": artifacts,
    })
