"""The training loop: epochs, validation, learning-rate schedule, stopping rules, NaN guard.

The loop runs the same way in one process and under torchrun. Every rank
trains on its shard of each epoch; validation covers each validation image
exactly once across ranks, and rank 0 alone writes checkpoints and log lines.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from captcha_ocr.charset import Codec, min_ctc_steps
from captcha_ocr.checkpoint import save_atomic
from captcha_ocr.config import TrainConfig
from captcha_ocr.data.dataset import DecodedSet, augment, make_batch
from captcha_ocr.data.images import Preprocessing
from captcha_ocr.metrics import character_errors
from captcha_ocr.model import coarse_output_steps, output_steps
from captcha_ocr.predict import combine_views
from captcha_ocr.record import report
from captcha_ocr.training.distributed import (
    DistributedContext,
    all_ranks_true,
    all_reduce_max,
    all_reduce_sum,
    broadcast_object,
    sync_buffers,
)
from captcha_ocr.training.signals import Interrupted, deferred_signals, pending_signal

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_NONFINITE = 10
VALIDATION_BATCH = 256


class TrainingError(RuntimeError):
    """Training cannot go on; the message gives the reason and the last good checkpoint."""


@dataclass
class TrainState:
    """Progress that a checkpoint carries from one session to the next."""

    epoch: int = 0
    global_step: int = 0
    best_accuracy: float = -1.0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    stale_epochs: int = 0
    elapsed: float = 0.0
    scheduled_lr: float = 0.0
    # The step at which the current warm-up began: 0, or the switch to the fine head.
    warmup_start: int = 0
    decay_logged: bool = False
    # Whether augmentation has started (see TrainConfig.augment_from).
    augmenting: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def _ctc_loss(logits: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, *, zero_infinity: bool) -> torch.Tensor:
    log_probs = logits.float().log_softmax(2)  # (T, N, C)
    steps, count = log_probs.shape[:2]
    input_lengths = torch.full((count,), steps, dtype=torch.long)
    return F.ctc_loss(log_probs, targets, input_lengths, lengths, blank=0, reduction="mean", zero_infinity=zero_infinity)


def presence_loss(logits: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Return a multi-label loss on which characters a label contains, whatever their order.

    A character's presence probability is its highest per-step probability.
    Present characters are pushed up at some step and absent ones down at
    every step, which gives each column's character scores a direct signal
    while CTC still emits only blanks.
    """
    log_probs = logits.float().log_softmax(2)[:, :, 1:]  # (T, N, C-1), blank left out
    peak = log_probs.max(dim=0).values  # (N, C-1)
    lengths = lengths.to(peak.device)
    present = torch.zeros_like(peak)
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=peak.device), lengths)
    present[rows, targets - 1] = 1.0
    absent_log = torch.log1p(-peak.exp().clamp(max=1.0 - 1e-6))
    per_image = -(present * peak + (1.0 - present) * absent_log).sum(dim=1)
    return (per_image / lengths.clamp(min=1)).mean()


def training_loss(
    coarse: torch.Tensor,
    fine: torch.Tensor | None,
    targets: torch.Tensor,
    lengths: torch.Tensor,
    *,
    presence_weight: float,
    fine_active: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the loss to minimise and the CTC loss of the output head, which the log reports.

    The loss to minimise is the coarse head's CTC loss and its weighted
    presence loss, plus the fine head's CTC loss once that head is active.
    The coarse CTC loss uses ``zero_infinity``, because a label may need more
    steps than the coarse head has while the fine head has enough.
    """
    coarse_loss = _ctc_loss(coarse, targets, lengths, zero_infinity=fine is not None)
    total = coarse_loss
    if presence_weight > 0:
        total = total + presence_weight * presence_loss(coarse, targets, lengths)
    if fine is None:
        return total, coarse_loss
    if fine_active:
        fine_loss = _ctc_loss(fine, targets, lengths, zero_infinity=False)
        return total + fine_loss, fine_loss
    # The zero term gives the idle fine head gradients (of zero), which
    # DistributedDataParallel requires of every parameter.
    return total + 0.0 * fine.float().sum(), coarse_loss


def members_training_loss(
    coarse: torch.Tensor,
    fine: torch.Tensor | None,
    targets: torch.Tensor,
    lengths: torch.Tensor,
    members: int,
    *,
    presence_weight: float,
    fine_active: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return :func:`training_loss` summed over the members and its reported loss averaged over them.

    The logits hold the members one after another along the batch axis (see
    ``captcha_ocr.model.MemberSet``). With the sum, each member gets the
    gradients it would get if trained alone.
    """
    fines = fine.chunk(members, dim=1) if fine is not None else [None] * members
    losses = [
        training_loss(
            member_coarse, member_fine, targets, lengths, presence_weight=presence_weight, fine_active=fine_active
        )
        for member_coarse, member_fine in zip(coarse.chunk(members, dim=1), fines, strict=True)
    ]
    return torch.stack([loss for loss, _ in losses]).sum(), torch.stack([loss for _, loss in losses]).mean()


def precision_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


class Trainer:
    """Owns the model, optimizer and scheduler of one training session."""

    def __init__(
        self,
        *,
        model: nn.Module,
        codec: Codec,
        preprocessing: Preprocessing,
        config: TrainConfig,
        train_set: DecodedSet,
        val_set: DecodedSet,
        device: torch.device,
        context: DistributedContext,
        checkpoint_dir: Path | None,
        model_info: dict[str, Any],
        augment_enabled: bool,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = False,
    ) -> None:
        self.model = model.to(device)
        self.codec = codec
        self.preprocessing = preprocessing
        self.config = config
        self.train_set = train_set
        self.val_set = val_set
        self.device = device
        self.context = context
        self.checkpoint_dir = checkpoint_dir
        self.model_info = model_info
        self.augment_enabled = augment_enabled
        self.on_epoch = on_epoch
        self.progress = progress and context.is_main
        self.amp_dtype = precision_dtype(config.precision)

        if context.enabled:
            device_ids = [device.index] if device.type == "cuda" else None
            self.network: nn.Module = DistributedDataParallel(self.model, device_ids=device_ids)
        else:
            self.network = self.model
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience,
            threshold=config.lr_threshold, min_lr=config.min_lr,
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16" and device.type == "cuda")
        self.sampler = DistributedSampler(
            range(len(train_set)), num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=config.seed
        )
        self.state = TrainState(scheduled_lr=config.lr, augmenting=config.augment_from <= 0)
        self.val_indices = np.arange(context.rank, len(val_set), context.world_size)
        self.sample_indices = np.arange(min(config.sample_count, len(val_set)))
        self.background = (1.0 - preprocessing.mean) / preprocessing.std
        self.stop_reason = ""
        self.last_checkpoint: Path | None = None
        # Skipped steps in a row, counted across epoch boundaries.
        self.nonfinite_streak = 0
        self.decay_started = False
        self.output_steps = output_steps(preprocessing.width, self.model.config.steps_per_column)
        # Networks in the model: more than 1 for a MemberSet.
        self.members = self.model.config.members
        self.coarse_steps = coarse_output_steps(preprocessing.width)
        # Labels the coarse head cannot emit need the fine head from the first step.
        self.coarse_too_short = any(
            min_ctc_steps(label) > self.coarse_steps for label in [*train_set.labels, *val_set.labels]
        )
        if self.coarse_too_short and self.model.has_fine_head:
            self.model.activate_fine_head()
        # An exponential moving average of the weights (and BatchNorm statistics)
        # is what validation reads and what checkpoints store as the model.
        self.ema: AveragedModel | None = None
        if config.ema_decay > 0:
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
        self.eval_model: nn.Module = self.ema.module if self.ema is not None else self.model

    # ------------------------------------------------------------------ state
    def checkpoint_payload(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            **self.model_info,
            "kind": "training",
            "model_state": self.eval_model.state_dict(),
            "training_model_state": self.model.state_dict(),
            "ema_updates": int(self.ema.n_averaged) if self.ema is not None else 0,
            "epoch": self.state.epoch,
            "metrics": self.state.history[-1] if self.state.history else {},
            "train_config": self.config.to_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "scaler_state": self.scaler.state_dict(),
            "train_state": asdict(self.state),
            "rng": rng,
        }

    def load_payload(self, payload: dict[str, Any]) -> None:
        """Restore model, optimizer, scheduler, progress and random states from a checkpoint."""
        # Checkpoints written before the weight average existed hold one set of weights.
        self.model.load_state_dict(payload.get("training_model_state", payload["model_state"]))
        if self.ema is not None:
            self.ema.module.load_state_dict(payload["model_state"])
            self.ema.n_averaged.fill_(int(payload.get("ema_updates", 1)))
        self.optimizer.load_state_dict(payload["optimizer_state"])
        self.scheduler.load_state_dict(payload["scheduler_state"])
        if payload.get("scaler_state") and self.scaler.is_enabled():
            self.scaler.load_state_dict(payload["scaler_state"])
        saved_state = dict(payload["train_state"])
        # Checkpoints written before augmentation waited for accuracy augmented from the start.
        saved_state.setdefault("augmenting", True)
        self.state = TrainState(**saved_state)
        rng = payload.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"].cpu())
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([state.cpu() for state in rng["cuda"]])

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _apply_warmup(self) -> None:
        """Ramp the learning rate linearly from lr/10 to the scheduled value over the warm-up steps.

        A warm-up runs at the start and again after the switch to the fine head.
        """
        steps = self.config.warmup_steps
        done = self.state.global_step - self.state.warmup_start
        if steps and done < steps:
            ramp = 0.1 + 0.9 * done / steps
            self._set_lr(self.state.scheduled_lr * ramp)
        elif steps and done == steps:
            self._set_lr(self.state.scheduled_lr)

    def _progress_at_epoch_start(self, epoch: int) -> tuple[float, float]:
        """Return the share of training done when ``epoch`` starts and the share one epoch adds.

        The share counts epochs against ``--epochs`` and, with ``--max-time``,
        seconds against the budget, whichever is further. Rank 0's clock
        decides, so that every rank sets the same learning rate.
        """
        config = self.config
        start, per_epoch = (epoch - 1) / config.epochs, 1 / config.epochs
        budget = config.max_time_seconds
        if budget:
            last = self.state.history[-1]["epoch_time"] if self.state.history else 0.0
            elapsed, last = broadcast_object((self.state.elapsed, last), self.context)
            if elapsed / budget > start:
                start, per_epoch = elapsed / budget, last / budget
        return start, per_epoch

    def _apply_final_decay(self, progress: float) -> None:
        """Lower the learning rate linearly to ``min_lr`` over the last ``decay_fraction`` of training."""
        fraction = self.config.decay_fraction
        if fraction <= 0 or progress < 1 - fraction:
            return
        factor = max(0.0, (1 - progress) / fraction)
        decayed = self.config.min_lr + (self.state.scheduled_lr - self.config.min_lr) * factor
        self._set_lr(min(decayed, self.current_lr()))

    def _warmed_up(self) -> bool:
        return self.state.global_step >= self.state.warmup_start + self.config.warmup_steps

    # ------------------------------------------------------------------ epochs
    def fit(self) -> str:
        """Train until a stopping rule fires; returns the reason."""
        config = self.config
        budget = config.max_time_seconds
        while True:
            reason = self._stop_reason_before_epoch(budget)
            reason = broadcast_object(reason, self.context)
            if reason:
                self.stop_reason = reason
                return reason
            self._run_epoch(self.state.epoch + 1)
            reason = broadcast_object(self._stop_reason_after_epoch(budget), self.context)
            if reason:
                self.stop_reason = reason
                return reason

    def _stop_reason_before_epoch(self, budget: float | None) -> str:
        if self.state.epoch >= self.config.epochs:
            epochs = self.config.epochs
            return f"reached the maximum of {epochs} epoch{'s' if epochs != 1 else ''}"
        if budget is not None and self.state.history:
            last = self.state.history[-1]["epoch_time"]
            if self.state.elapsed + last > budget:
                return (
                    f"time budget {self.config.max_time} reached: {self.state.elapsed:.0f}s spent, "
                    f"another epoch (about {last:.0f}s) would exceed it"
                )
        return ""

    def _stop_reason_after_epoch(self, budget: float | None) -> str:
        patience = self.config.early_stop_patience
        if patience and self.state.stale_epochs >= patience:
            return f"early stopping: validation accuracy did not improve for {patience} epochs"
        if budget is not None and self.state.elapsed >= budget:
            return f"time budget {self.config.max_time} reached after {self.state.elapsed:.0f}s"
        return ""

    def _run_epoch(self, epoch: int) -> None:
        config = self.config
        # Seeding per epoch makes a resumed run draw the same shuffles and augmentations.
        torch.manual_seed(config.seed * 100_003 + epoch * 1_009 + self.context.rank)
        started = time.monotonic()
        lr_at_start = self.current_lr()
        train_loss, images = self._train_epoch(epoch)
        validation = self._validate()
        epoch_time = time.monotonic() - started
        self.state.elapsed += epoch_time
        self.state.epoch = epoch

        lr_before = self.current_lr()
        # Once the final decay runs, it alone sets the learning rate.
        plateau_active = self._warmed_up() and not self.decay_started
        if plateau_active:
            self.scheduler.step(validation["val_loss"])
        lr_after = self.current_lr()
        if plateau_active:
            self.state.scheduled_lr = lr_after
        switched = self._maybe_activate_fine_head(validation["val_accuracy"])
        augmentation_starts = self._maybe_start_augmenting(validation["val_accuracy"])

        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            **validation,
            "lr": lr_before,
            "epoch_time": epoch_time,
            "images_per_second": images / epoch_time if epoch_time > 0 else 0.0,
            "elapsed": self.state.elapsed,
        }
        self.state.history.append(row)
        improved = self._update_best(row)
        if not self.context.is_main:
            return
        samples = self._sample_predictions()

        # A signal here would leave a checkpoint without its log lines and metrics row.
        with deferred_signals():
            saved = self._save_checkpoints(improved)
            report.log_sample_predictions(logger, epoch, config.epochs, samples)
            logger.info(report.epoch_line(epoch, config.epochs, row))
            if lr_after < lr_before - 1e-12:
                report.log_lr_reduced(logger, lr_before, lr_after)
            elif self.decay_started and lr_before < lr_at_start - 1e-12:
                # The final decay lowers the rate step by step; one line per epoch keeps every reduction greppable.
                report.log_lr_reduced(logger, lr_at_start, lr_before, "final linear decay")
            if switched:
                report.log_fine_head(logger, self.coarse_steps, self.output_steps, validation["val_accuracy"])
            if augmentation_starts:
                report.log_augmentation_starts(logger, validation["val_accuracy"], config.augment_from)
            for what, path in saved:
                report.log_saved(logger, what, str(path))
            if self.on_epoch is not None:
                self.on_epoch({**row, "samples": [{"label": a, "prediction": p} for a, p in samples]})

    def _update_best(self, row: dict[str, Any]) -> bool:
        """Track the best epoch (accuracy first, then loss) and epochs without a better accuracy."""
        state = self.state
        previous_accuracy = state.best_accuracy
        better = row["val_accuracy"] > state.best_accuracy or (
            row["val_accuracy"] == state.best_accuracy and row["val_loss"] < state.best_val_loss
        )
        if better:
            state.best_accuracy = row["val_accuracy"]
            state.best_val_loss = row["val_loss"]
            state.best_epoch = row["epoch"]
        state.stale_epochs = 0 if row["val_accuracy"] > previous_accuracy else state.stale_epochs + 1
        return better

    def _save_checkpoints(self, improved: bool) -> list[tuple[str, Path]]:
        if self.checkpoint_dir is None:
            return []
        payload = self.checkpoint_payload()
        saved = []
        with deferred_signals():
            last = save_atomic(payload, self.checkpoint_dir / "last.pt")
            self.last_checkpoint = last
            saved.append(("Last checkpoint", last))
            if improved:
                best = save_atomic(payload, self.checkpoint_dir / "best.pt")
                saved.append((f"Best checkpoint (epoch {self.state.epoch})", best))
        return saved

    def stop_if_interrupted(self) -> None:
        """Raise :class:`Interrupted` on every rank when any rank has a signal recorded.

        Every rank calls this at the same points, so all of them leave the loop
        together and none is left waiting in a collective.
        """
        signum = all_reduce_max(pending_signal() or 0, self.context, self.device)
        if signum:
            raise Interrupted(signum)

    def _train_epoch(self, epoch: int) -> tuple[float, int]:
        config = self.config
        progress_start, progress_per_epoch = self._progress_at_epoch_start(epoch)
        # The tolerance keeps float rounding from starting the decay an epoch early.
        decay_start = 1 - config.decay_fraction + 1e-9
        self.decay_started = config.decay_fraction > 0 and progress_start + progress_per_epoch > decay_start
        if self.decay_started and not self.state.decay_logged and self.context.is_main:
            report.log_final_decay(logger, self.state.scheduled_lr, config.min_lr, config.decay_fraction, epoch)
        self.state.decay_logged = self.state.decay_logged or self.decay_started
        self.network.train()
        self.sampler.set_epoch(epoch)
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        augment_generator = torch.Generator().manual_seed(config.seed * 7_919 + epoch * 131 + self.context.rank)
        bar = tqdm(batches, desc=f"Epoch {epoch}/{config.epochs}", unit="batch", leave=False, disable=not self.progress)

        loss_sum, seen = 0.0, 0
        for batch_number, indices in enumerate(bar, start=1):
            self.stop_if_interrupted()
            batch = make_batch(self.train_set, indices, self.codec, self.preprocessing)
            images = batch.images.to(self.device, non_blocking=True)
            member_batches = False
            if self.augment_enabled and self.state.augmenting:
                # Each member of a MemberSet reads its own augmentation of the batch.
                images = torch.cat([augment(images, augment_generator, self.background) for _ in range(self.members)])
                member_batches = self.members > 1
            self._apply_warmup()
            if self.decay_started:
                step_progress = progress_start + progress_per_epoch * (batch_number - 1) / len(batches)
                self._apply_final_decay(step_progress)

            loss, reported_loss = self._loss(images, batch, member_batches)
            if not all_ranks_true(bool(torch.isfinite(loss).item()), self.context, self.device):
                self._report_nonfinite("loss", epoch, batch_number)
                continue

            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
            # Each member is clipped on its own, as if it were trained alone.
            norms = [torch.nn.utils.clip_grad_norm_(group, max_norm) for group in self.model.member_parameters()]
            if not self.scaler.is_enabled() and not all(torch.isfinite(norm) for norm in norms):
                self.optimizer.zero_grad(set_to_none=True)
                self._report_nonfinite("gradient", epoch, batch_number)
                continue
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update_parameters(self.model)

            self.nonfinite_streak = 0
            self.state.global_step += 1
            loss_sum += reported_loss.item() * len(indices)
            seen += len(indices)
            if self.progress:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{self.current_lr():.1e}")

        total_loss, total_seen = all_reduce_sum([loss_sum, float(seen)], self.context, self.device)
        return (total_loss / total_seen if total_seen else math.nan), int(total_seen)

    def _loss(self, images: torch.Tensor, batch: Any, member_batches: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the loss to minimise and the CTC loss of the output head (see :func:`training_loss`).

        For a MemberSet, see :func:`members_training_loss`.
        """
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            coarse, fine = self.network(images, both_heads=True, member_batches=member_batches)
        return members_training_loss(
            coarse, fine, batch.targets.to(self.device), batch.target_lengths, self.members,
            presence_weight=self.config.presence_weight, fine_active=self.model.fine_active,
        )

    def _maybe_activate_fine_head(self, val_accuracy: float) -> bool:
        """Switch the output to the fine head once the coarse head reads well enough."""
        model = self.model
        if not model.has_fine_head or model.fine_active:
            return False
        if val_accuracy < self.config.fine_head_at and not self.coarse_too_short:
            return False
        model.activate_fine_head()
        if self.ema is not None:
            self.ema.module.activate_fine_head()
        # The fine head's validation loss is on another scale, so the plateau
        # scheduler starts its comparison afresh.
        self.scheduler.best = self.scheduler.mode_worse
        self.scheduler.num_bad_epochs = 0
        # In its idle phase the fine head's only gradient was weight decay, so
        # its Adam moments would make its first real steps several times the
        # learning rate. Fresh moments and a second warm-up keep the new loss
        # from undoing what the shared layers learnt.
        for parameter in model.fine_head_parameters():
            self.optimizer.state.pop(parameter, None)
        self.state.warmup_start = self.state.global_step
        return True

    def _maybe_start_augmenting(self, val_accuracy: float) -> bool:
        """Start augmenting from the next epoch once the model reads clean images well enough.

        Augmented images make the all-blank plateau at the start longer. On two
        captcha_images_v2 splits (batch 32, 25 epochs), the validation accuracy
        first reached 50% at epochs 13 and 11 with augmentation held back until
        30%, and at epochs 17 and 16 with augmentation from the start.
        """
        if not self.augment_enabled or self.state.augmenting or val_accuracy < self.config.augment_from:
            return False
        self.state.augmenting = True
        return True

    def _report_nonfinite(self, what: str, epoch: int, batch_number: int) -> None:
        self.nonfinite_streak += 1
        count = self.nonfinite_streak
        if self.context.is_main:
            logger.warning("Non-finite %s at epoch %d, batch %d: step skipped (%d in a row)", what, epoch, batch_number, count)
        if count >= MAX_CONSECUTIVE_NONFINITE:
            where = self.last_checkpoint or "none saved yet"
            raise TrainingError(
                f"training stopped: {count} non-finite steps in a row at epoch {epoch}; "
                f"last good checkpoint: {where}. Try a lower --lr or check the data"
            )

    # -------------------------------------------------------------- validation
    def _predict_texts(self, indices: np.ndarray) -> tuple[list[str], torch.Tensor]:
        """Decode images by index with the output head; returns texts and each sample's length-normalised CTC loss."""
        batch = make_batch(self.val_set, indices, self.codec, self.preprocessing)
        images = batch.images.to(self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            coarse, fine = self.eval_model(images, both_heads=True)
        logits = fine if fine is not None and self.eval_model.fine_active else coarse
        log_probs = logits.float().log_softmax(2)  # (T, members * N, C)
        steps, rows = log_probs.shape[:2]
        members = self.members
        losses = F.ctc_loss(
            log_probs, batch.targets.to(self.device).repeat(members), torch.full((rows,), steps, dtype=torch.long),
            batch.target_lengths.repeat(members), blank=0, reduction="none", zero_infinity=False,
        )
        # A MemberSet's loss for an image is the mean of its members' losses.
        losses = (losses.cpu() / batch.target_lengths.repeat(members).clamp(min=1)).view(members, -1).mean(dim=0)
        lengths = self.model_info.get("label_lengths")
        if members == 1:
            best_paths = self.codec.decode_paths(log_probs.cpu().numpy(), lengths)  # (T, N)
            return [self.codec.decode_indices(best_paths[:, n]) for n in range(rows)], losses
        # The members' readings are combined as Recognizer combines them.
        member_log_probs = log_probs.double().cpu().numpy()
        readings = self.codec.decode_log_probs(member_log_probs, lengths)
        return [p.text for p in combine_views(member_log_probs, readings, self.codec, members)], losses

    def _validate(self) -> dict[str, float]:
        """Score every validation image once across all ranks."""
        self.stop_if_interrupted()
        sync_buffers(self.model, self.context)
        if self.ema is not None:
            sync_buffers(self.ema.module, self.context)
        self.eval_model.eval()
        loss_sum, correct, char_errors, chars = 0.0, 0, 0, 0
        with torch.inference_mode():
            for start in range(0, len(self.val_indices), VALIDATION_BATCH):
                indices = self.val_indices[start : start + VALIDATION_BATCH]
                texts, losses = self._predict_texts(indices)
                truths = [self.val_set.labels[i] for i in indices]
                loss_sum += float(losses.sum())
                correct += sum(t == p for t, p in zip(truths, texts, strict=True))
                errors, total = character_errors(truths, texts)
                char_errors += errors
                chars += total
        totals = all_reduce_sum(
            [loss_sum, float(len(self.val_indices)), float(correct), float(char_errors), float(chars)],
            self.context, self.device,
        )
        loss_sum, count, correct, char_errors, chars = totals
        return {
            "val_loss": loss_sum / count if count else math.nan,
            "val_accuracy": correct / count if count else 0.0,
            "val_cer": char_errors / chars if chars else 0.0,
            "val_count": int(count),
        }

    def _sample_predictions(self) -> list[tuple[str, str]]:
        if not len(self.sample_indices):
            return []
        self.eval_model.eval()
        with torch.inference_mode():
            texts, _ = self._predict_texts(self.sample_indices)
        return [(self.val_set.labels[i], text) for i, text in zip(self.sample_indices, texts, strict=True)]
