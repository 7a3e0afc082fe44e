"""Optional TensorBoard scalars per epoch, in ``runs/<ID>/tensorboard/``.

``torch.utils.tensorboard`` needs the ``tensorboard`` package, which is an
optional extra; without it training goes on and the log gives the install command.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# TensorBoard tag -> key of the epoch row (the same keys as metrics.jsonl).
SCALARS = {
    "loss/train": "train_loss",
    "loss/val": "val_loss",
    "accuracy/val": "val_accuracy",
    "cer/val": "val_cer",
    "lr": "lr",
    "speed/images_per_second": "images_per_second",
    "time/epoch_seconds": "epoch_time",
}

INSTALL_HINT = "in the captcha-ocr checkout, pip install -e '.[tensorboard]'"


class TensorBoardScalars:
    """Writes one point per scalar and epoch, flushed at the end of each epoch."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        # The session has no teardown hook for this object; close the file when it is dropped.
        self._finalizer = weakref.finalize(self, writer.close)

    def add_epoch(self, row: Mapping[str, Any]) -> None:
        for tag, key in SCALARS.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(tag, float(value), int(row["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        self._finalizer()


def open_tensorboard(folder: Path) -> TensorBoardScalars | None:
    """Start writing scalars to ``folder``; None, after one warning, when TensorBoard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning(
            "TensorBoard logging is off: the tensorboard package is not installed. "
            "Install it with: %s", INSTALL_HINT,
        )
        return None
    writer = SummaryWriter(log_dir=str(folder))
    logger.info("TensorBoard scalars: %s (view with: tensorboard --logdir %s)", folder, folder)
    return TensorBoardScalars(writer)
