"""Training under failure: crashes, non-finite steps, bad files, unsafe checkpoints, stopping rules."""

from __future__ import annotations

import builtins
import math
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from captcha_ocr import cli
from captcha_ocr.checkpoint import CheckpointError, load_checkpoint, save_atomic
from captcha_ocr.config import ConfigError, TrainConfig
from captcha_ocr.data.images import ImageError, Preprocessing, load_image
from captcha_ocr.model import CRNN, output_steps
from captcha_ocr.predict import Recognizer
from captcha_ocr.session import train
from captcha_ocr.training.loop import MAX_CONSECUTIVE_NONFINITE, Trainer
from tests import process_support as proc
from tests.conftest import CASES, require

UNUSABLE = {"empty0.png", "trunc1.png", "notes2.png", "bomb3.png", "readme.txt"}
USABLE = {"gray4.png", "cmyk5.jpg"}


@pytest.fixture(scope="module")
def images(generated_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("robust-images") / "images"
    shutil.copytree(generated_folder, folder)
    return folder


def tiny(data: list[Path], output: Path, **settings) -> TrainConfig:
    values = {"data": [str(d) for d in data], "output_dir": str(output), "epochs": 2, **proc.TINY_SETTINGS}
    values.update(settings)
    return TrainConfig.build(values)


def warnings_naming(log_file: Path, name: str) -> list[str]:
    return [m for level, m in proc.messages(log_file) if level == "WARNING" and name in m]


# ---------------------------------------------------------------------- crashes


def test_crash_logged_with_traceback(images, tmp_path, monkeypatch):
    original = Trainer._train_epoch

    def fail_in_epoch_two(self, epoch):
        if epoch == 2:
            raise RuntimeError("simulated failure in epoch 2")
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", fail_in_epoch_two)
    result = train(tiny([images], tmp_path, epochs=3), console=False, progress=False)

    assert (result.status, result.exit_code) == ("failed", 1)
    lines = result.log_file.read_text(encoding="utf-8").splitlines()
    error_at = next(i for i, line in enumerate(lines) if "[ERROR] Uncaught error during training" in line)
    assert "RuntimeError: simulated failure in epoch 2" in lines[error_at]
    assert lines[error_at + 1] == "Traceback (most recent call last):"
    assert any("fail_in_epoch_two" in line for line in lines[error_at:])
    last = result.run_dir / "checkpoints" / "last.pt"
    assert lines[-1].endswith(f"[ERROR] TRAINING FAILED; last good checkpoint: {last}")
    assert load_checkpoint(last)["epoch"] == 1

    summary = proc.read_json(result.run_dir / "summary.json")
    assert summary["status"] == "failed"
    assert summary["exit_code"] == 1
    assert "simulated failure in epoch 2" in summary["error"]
    assert summary["epochs_completed"] == 1


# ------------------------------------------------------------- non-finite steps


def _poison_training_forward(
    monkeypatch, nan_calls: set[int] = frozenset(), inf_gradient_calls: set[int] = frozenset(),
    nan_from: int | None = None,
) -> None:
    """Make chosen training forward passes (counted from 1) give NaN logits or infinite gradients.

    ``nan_from`` poisons that call and every later one. Validation passes are left alone.
    """
    original = CRNN.forward
    calls = 0

    def forward(self, images, both_heads=False, member_batches=False):
        nonlocal calls
        outputs = original(self, images, both_heads=both_heads, member_batches=member_batches)
        if not self.training:
            return outputs
        # Training requests both heads, and the coarse head is the one it learns first.
        coarse, fine = outputs
        calls += 1
        if calls in nan_calls or (nan_from is not None and calls >= nan_from):
            return coarse * float("nan"), fine
        if calls in inf_gradient_calls:
            coarse.register_hook(lambda grad: grad * float("inf"))
        return coarse, fine

    monkeypatch.setattr(CRNN, "forward", forward)


def test_non_finite_steps_are_skipped_and_reported(images, tmp_path, monkeypatch):
    _poison_training_forward(monkeypatch, nan_calls={2, 3}, inf_gradient_calls={5})
    result = train(tiny([images], tmp_path, epochs=2), console=False, progress=False)

    assert result.status == "completed", result.error
    warnings = [m for level, m in proc.messages(result.log_file) if level == "WARNING"]
    assert warnings == [
        "Non-finite loss at epoch 1, batch 2: step skipped (1 in a row)",
        "Non-finite loss at epoch 1, batch 3: step skipped (2 in a row)",
        "Non-finite gradient at epoch 1, batch 5: step skipped (1 in a row)",
    ]
    weights = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["model_state"]
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    assert math.isfinite(proc.read_json(result.run_dir / "summary.json")["final"]["train_loss"])


def test_non_finite_streak_stops_run(images, tmp_path, monkeypatch):
    batches_per_epoch = math.ceil(43 / proc.TINY_SETTINGS["batch_size"])  # 48 images, 5 for validation
    _poison_training_forward(monkeypatch, nan_from=batches_per_epoch + 1)  # every step from epoch 2 on
    result = train(tiny([images], tmp_path, epochs=10), console=False, progress=False)

    assert (result.status, result.exit_code) == ("failed", 1)
    warnings = [m for level, m in proc.messages(result.log_file) if level == "WARNING"]
    assert len(warnings) == MAX_CONSECUTIVE_NONFINITE
    assert warnings[0] == "Non-finite loss at epoch 2, batch 1: step skipped (1 in a row)"
    assert f"({MAX_CONSECUTIVE_NONFINITE} in a row)" in warnings[-1]
    last = result.run_dir / "checkpoints" / "last.pt"
    assert f"{MAX_CONSECUTIVE_NONFINITE} non-finite steps in a row" in result.error
    assert str(last) in result.error
    lines = [m for _, m in proc.messages(result.log_file)]
    assert lines[-2] == result.error
    assert lines[-1] == f"TRAINING FAILED; last good checkpoint: {last}"
    assert proc.read_json(result.run_dir / "summary.json")["status"] == "failed"


# --------------------------------------------------------------------- bad data


@pytest.fixture
def mixed_folder(images, tmp_path) -> Path:
    """The generated images plus every file of the bad-files case."""
    bad = require(CASES / "bad_files")
    folder = tmp_path / "mixed"
    shutil.copytree(images, folder)
    for path in bad.iterdir():
        shutil.copy(path, folder / path.name)
    return folder


def test_bad_files_are_skipped_one_warning_each(mixed_folder, tmp_path):
    assert {p.name for p in (CASES / "bad_files").iterdir()} == UNUSABLE | USABLE
    result = train(tiny([mixed_folder], tmp_path / "out", epochs=1), console=False, progress=False)
    assert result.status == "completed", result.error

    for name in UNUSABLE:
        assert len(warnings_naming(result.log_file, name)) == 1, name
    for name in USABLE:
        assert warnings_naming(result.log_file, name) == [], name
    (bomb_warning,) = warnings_naming(result.log_file, "bomb3.png")
    assert "decompression bomb" in bomb_warning

    skipped = (result.run_dir / "skipped.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert {Path(line.split("\t")[0]).name for line in skipped} == UNUSABLE
    data = proc.read_json(result.run_dir / "data.json")
    assert data["files_found"] == 48 + len(UNUSABLE | USABLE)
    assert data["files_skipped"] == len(UNUSABLE)
    assert data["train"]["count"] + data["val"]["count"] == 48 + len(USABLE)

    text = result.log_file.read_text(encoding="utf-8")
    assert f"Images found: {48 + 7}\n" in text
    assert f"Images skipped: {len(UNUSABLE)}\n" in text
    assert "1 x decompression bomb refused" in text
    assert f"Skipped files listed in: {result.run_dir / 'skipped.txt'}" in text


def test_greyscale_and_cmyk_load_like_any_image():
    folder = require(CASES / "bad_files")
    preprocessing = Preprocessing(height=32, width=96)
    for name in USABLE:
        pixels = load_image(folder / name, preprocessing)
        assert pixels.shape == (32, 96)
        assert 0 < pixels.mean() < 255  # neither blank white nor black


def test_bomb_is_refused_without_decoding(monkeypatch):
    from PIL import ImageFile

    bomb = require(CASES / "bad_files" / "bomb3.png")
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size))
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(bomb, Preprocessing())
    assert decoded == []


def test_max_pixels_is_configurable(images, tmp_path):
    sample = next(images.glob("*.png"))
    with pytest.raises(ImageError, match="exceeds the limit of 5000 .*--max-pixels"):
        load_image(sample, Preprocessing(max_pixels=5000))

    result = train(tiny([images], tmp_path, max_pixels=5000), console=False, progress=False)
    assert (result.status, result.exit_code) == ("failed", 2)
    assert "no usable images" in result.error
    assert len(warnings_naming(result.log_file, "exceeds the limit of 5000")) == 48


@pytest.mark.slow
def test_nothing_usable_stops_with_one_line_error(tmp_path):
    bad = require(CASES / "bad_files")
    folder = tmp_path / "unusable"
    folder.mkdir()
    for name in UNUSABLE:
        shutil.copy(bad / name, folder / name)
    completed = proc.run(
        proc.cli("train", str(folder), *proc.TINY_FLAGS, "--output-dir", str(tmp_path / "out")), tmp_path
    )
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stderr
    last_line = completed.stderr.strip().splitlines()[-1]
    assert last_line.startswith("captcha-ocr train: error: no usable images in ")
    assert f"{len(UNUSABLE)} files found, 0 usable" in last_line
    _, log_file, run_dir = proc.only_run(tmp_path / "out")
    assert proc.messages(log_file)[-1][1].startswith("TRAINING FAILED")
    for name in UNUSABLE:
        assert len(warnings_naming(log_file, name)) == 1, name
    skipped = (run_dir / "skipped.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert {Path(line.split("\t")[0]).name for line in skipped} == UNUSABLE
    assert proc.read_json(run_dir / "summary.json")["exit_code"] == 2


def test_labels_outside_an_explicit_charset_are_skipped(images, tmp_path):
    folder = tmp_path / "letters"
    shutil.copytree(images, folder)
    pictures = sorted(images.glob("*.png"))
    shutil.copy(pictures[0], folder / "ab12_extra.png")
    shutil.copy(pictures[1], folder / "9z9z_extra.png")

    result = train(tiny([folder], tmp_path / "out", epochs=1, charset="digits"), console=False, progress=False)
    assert result.status == "completed", result.error
    for name, outside in (("ab12_extra.png", "ab"), ("9z9z_extra.png", "z")):
        (warning,) = warnings_naming(result.log_file, name)
        assert "outside the charset" in warning
        assert repr(outside) in warning
    assert proc.read_json(result.run_dir / "data.json")["charset"] == "0123456789"


def test_too_long_label_stops_before_training_by_default(images, tmp_path):
    case = require(CASES / "too_long_label")
    steps = output_steps(proc.TINY_SETTINGS["width"])
    assert steps < 20
    result = train(tiny([images, case], tmp_path), console=False, progress=False)

    assert (result.status, result.exit_code) == ("failed", 2)
    message = result.error
    assert "abcdefghijklmnopqrst.png" in message
    assert "20 characters" in message
    assert f"the model emits only {steps}" in message
    assert "--too-long-labels skip" in message
    suggested = int(re.search(r"Train with --width (\d+) or more", message).group(1))
    assert output_steps(suggested) >= 20
    assert "\n" not in message
    text = result.log_file.read_text(encoding="utf-8")
    assert f"[ERROR] {message}" in text
    assert proc.logged_epochs(result.log_file) == []


def test_too_long_labels_can_be_skipped(images, tmp_path):
    case = require(CASES / "too_long_label")
    result = train(tiny([images, case], tmp_path, epochs=1, too_long_labels="skip"), console=False, progress=False)
    assert result.status == "completed", result.error
    (warning,) = warnings_naming(result.log_file, "abcdefghijklmnopqrst.png")
    assert "needs 20 output steps" in warning


# ---------------------------------------------------------------- safe loading


class RunsShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class ExecutesPython:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _malicious_files(folder: Path) -> list[tuple[Path, Path]]:
    """Checkpoint-looking files whose unpickling would create a marker file; (file, marker) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for index, (payload_type, writer) in enumerate(
        [(RunsShellCommand, "torch"), (ExecutesPython, "torch"), (ExecutesPython, "pickle")]
    ):
        marker = folder / f"marker{index}"
        path = folder / f"evil{index}.pth"
        payload = {"format": "captcha-ocr", "format_version": 1, "kind": "model", "extra": payload_type(marker)}
        if writer == "torch":
            torch.save(payload, path)
        else:
            path.write_bytes(pickle.dumps(payload, protocol=2))
        made.append((path, marker))
    return made


def test_text_model_file_unreadable(tmp_path):
    notes = tmp_path / "notes.pth"
    notes.write_text("# not a model\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as raised:
        load_checkpoint(notes)
    assert "weights_only" not in str(raised.value)


def test_crafted_checkpoints_are_refused_without_running_code(tmp_path):
    made = _malicious_files(tmp_path)
    # The files are truly dangerous: an unrestricted load runs their code.
    torch.load(made[1][0], weights_only=False)
    assert made[1][1].exists()
    made[1][1].unlink()

    for path, marker in made:
        with pytest.raises(CheckpointError, match="refused to load"):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match="nothing in it was run"):
            Recognizer.load(path)
        assert not marker.exists()


@pytest.mark.slow
def test_predict_and_resume_refuse_crafted_checkpoints(images, tmp_path):
    (path, marker), *_ = _malicious_files(tmp_path / "evil")
    picture = next(images.glob("*.png"))
    predicted = proc.run(proc.cli("predict", str(path), str(picture)), tmp_path)
    assert predicted.returncode == 2
    assert "refused to load" in predicted.stderr
    assert "Traceback" not in predicted.stderr

    # The same file planted as a run's last checkpoint, resumed by run ID.
    run_dir = tmp_path / "out" / "runs" / "20300101_000000"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(path, run_dir / "checkpoints" / "last.pt")
    resumed = proc.run(proc.cli("train", "--resume", "20300101_000000", "--output-dir", str(tmp_path / "out")), tmp_path)
    assert resumed.returncode == 2
    assert "refused to load" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert not marker.exists()


def test_other_format_version_gets_a_clear_message(tmp_path):
    path = save_atomic({"kind": "model"}, tmp_path / "model.pth")
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"format version 99 is newer than this captcha-ocr's version 1"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="format version 99"):
        Recognizer.load(path)


# -------------------------------------------------------------- stopping rules


def test_early_stopping(images, tmp_path):
    result = train(tiny([images], tmp_path, epochs=20, early_stop_patience=2), console=False, progress=False)
    assert result.status == "completed", result.error
    rows = proc.metrics_rows(result.run_dir)
    assert len(rows) < 20
    best_before = max(r["val_accuracy"] for r in rows[:-2])
    assert all(r["val_accuracy"] <= best_before for r in rows[-2:])
    reason = "early stopping: validation accuracy did not improve for 2 epochs"
    assert result.stop_reason == reason
    assert f"Stop reason: {reason}" in result.log_file.read_text(encoding="utf-8")
    assert proc.read_json(result.run_dir / "summary.json")["stop_reason"] == reason


def test_time_budget(images, tmp_path):
    result = train(tiny([images], tmp_path, epochs=500, max_time="1s"), console=False, progress=False)
    assert result.status == "completed", result.error
    summary = proc.read_json(result.run_dir / "summary.json")
    assert 1 <= summary["epochs_completed"] < 500
    assert summary["stop_reason"].startswith("time budget 1s reached")
    assert re.search(r"Stop reason: time budget 1s reached", result.log_file.read_text(encoding="utf-8"))


def test_max_epochs_is_an_alias_of_epochs(images, tmp_path, capsys):
    parsed = cli.build_parser().parse_args(["train", "--max-epochs", "3"])
    assert parsed.epochs == 3
    output = tmp_path / "out"
    code = cli.main(["train", str(images), *proc.TINY_FLAGS, "--max-epochs", "2", "--output-dir", str(output)])
    assert code == 0
    _, log_file, run_dir = proc.only_run(output)
    assert proc.logged_epochs(log_file) == [1, 2]
    assert proc.read_json(run_dir / "summary.json")["stop_reason"] == "reached the maximum of 2 epochs"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_is_refused_on_the_cpu(images, tmp_path, precision):
    config = tiny([images], tmp_path, precision=precision, device="cpu")
    with pytest.raises(ConfigError) as raised:
        train(config, console=False, progress=False)
    assert f"--precision {precision}" in str(raised.value)
    assert "--precision fp32 on the CPU" in str(raised.value)
    # Refused before the session starts, so no failed run is left behind.
    assert not (Path(config.output_dir) / "runs").exists() or not any((Path(config.output_dir) / "runs").iterdir())
