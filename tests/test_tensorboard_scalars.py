"""TensorBoard scalars: written per epoch when the package is there, one warning when it is not."""

import logging
import sys
import types

from captcha_ocr.record import tensorboard_scalars
from captcha_ocr.record.tensorboard_scalars import SCALARS, open_tensorboard


class RecordingWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter and keeps what it is given."""

    instances: list["RecordingWriter"] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.points: list[tuple[str, float, int]] = []
        self.flushes = 0
        self.closed = False
        RecordingWriter.instances.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.points.append((tag, value, step))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((record.levelname, record.getMessage()))


def _capture() -> ListHandler:
    handler = ListHandler()
    logging.getLogger(tensorboard_scalars.__name__).addHandler(handler)
    return handler


def test_one_point_per_scalar_and_epoch(monkeypatch, tmp_path):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = RecordingWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    board = open_tensorboard(tmp_path / "tensorboard")
    writer = RecordingWriter.instances[-1]
    assert writer.log_dir == str(tmp_path / "tensorboard")

    for epoch, loss in ((1, 2.5), (2, 1.5)):
        board.add_epoch({"epoch": epoch, "train_loss": loss, "val_loss": loss + 0.5, "val_accuracy": 0.1 * epoch,
                         "val_cer": 0.5, "lr": 1e-3, "epoch_time": 3.0, "images_per_second": 100.0,
                         "samples": [{"label": "1", "prediction": "1"}]})
    assert len(writer.points) == 2 * len(SCALARS)
    assert ("loss/train", 1.5, 2) in writer.points
    assert ("accuracy/val", 0.2, 2) in writer.points
    assert writer.flushes == 2
    board.close()
    assert writer.closed


def test_non_finite_values_skipped(monkeypatch, tmp_path):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = RecordingWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    board = open_tensorboard(tmp_path)
    board.add_epoch({"epoch": 1, "train_loss": float("nan"), "val_loss": 1.0})
    assert [tag for tag, _, _ in RecordingWriter.instances[-1].points] == ["loss/val"]


def test_missing_package_warns_once(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    handler = _capture()
    try:
        assert open_tensorboard(tmp_path / "tensorboard") is None
    finally:
        logging.getLogger(tensorboard_scalars.__name__).removeHandler(handler)
    assert len(handler.messages) == 1
    level, message = handler.messages[0]
    assert level == "WARNING"
    assert "pip install -e '.[tensorboard]'" in message
    assert not (tmp_path / "tensorboard").exists()
