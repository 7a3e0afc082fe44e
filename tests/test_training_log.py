"""A tiny real training run, checked against the documented log format and greps."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from captcha_ocr.config import TrainConfig
from captcha_ocr.predict import Recognizer
from captcha_ocr.session import train
from tests.conftest import TINY_MODEL

LINE = re.compile(r"^\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\] \[(INFO|WARNING|ERROR|DEBUG|CRITICAL)\] ")


def _tiny_config(data: Path, output: Path, **settings) -> TrainConfig:
    """Build the tiny model's configuration on ``data``, with a quarter held out for validation."""
    return TrainConfig.build(
        {"data": [str(data)], "output_dir": str(output), "val_split": 0.25, **TINY_MODEL, **settings}
    )


@pytest.fixture(scope="module")
def finished_run(generated_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("run")
    config = _tiny_config(generated_folder, output, epochs=2)
    result = train(config, console=False, progress=False)
    assert result.status == "completed", result.error
    return result, output


def grep(pattern: str, *files: Path) -> list[str]:
    """Run the real grep, as a user would, and return the matching lines."""
    completed = subprocess.run(["grep", "-h", pattern, *map(str, files)], capture_output=True, text=True)
    return completed.stdout.splitlines()


def test_log_file_layout(finished_run):
    result, output = finished_run
    assert re.fullmatch(r"training_\d{8}_\d{6}(_\d+)?\.log", result.log_file.name)
    assert result.log_file.parent == output / "logs"
    assert (output / "models" / f"captcha_model_{result.session_id}.pth").is_file()
    assert (output / "models" / "captcha_model_latest.pth").is_file()


def test_every_line_has_the_format(finished_run):
    result, _ = finished_run
    lines = result.log_file.read_text(encoding="utf-8").splitlines()
    assert len(lines) > 40
    for line in lines:
        assert LINE.match(line), line


def test_sections_in_order(finished_run):
    result, _ = finished_run
    text = result.log_file.read_text(encoding="utf-8")
    phrases = [
        "CAPTCHA RECOGNITION TRAINING SESSION STARTED",
        "Run folder: ",
        "PyTorch Version: ",
        "Device: cpu",
        "Configuration:",
        "  - Epochs: 2",
        "  - Batch Size: 8",
        "All characters used in label encoding: ['0' '1' '2'",
        "TRAIN/TEST SPLIT:",
        "   Training images: 36",
        "   Testing images:  12",
        "Ratio: 75.0% / 25.0%",
        "Model created with 10 character classes",
        "Model parameters: ",
        "Optimizer: Adam (lr=3e-3, weight_decay=1e-5)",
        "Scheduler: ReduceLROnPlateau (factor=0.5, patience=3)",
        "STARTING TRAINING LOOP",
        "Epoch 1/2 - Sample predictions:",
        "Epoch 1/2 - Train Loss: ",
        "Epoch 2/2 - Train Loss: ",
        "✅ Model (best epoch",
        "🎉 TRAINING COMPLETED SUCCESSFULLY!",
        "TRAINING SUMMARY:",
        "   • Final accuracy: ",
        "   • Best accuracy: ",
        "   • Training samples: 36, validation samples: 12",
        "   • Character classes: 10",
        "   • Total time: ",
        f"   • Session ID: {result.session_id}",
        f"   • Log file: {result.log_file}",
    ]
    position = 0
    for phrase in phrases:
        found = text.find(phrase, position)
        assert found >= 0, f"{phrase!r} missing after position {position}"
        position = found


def test_sample_predictions_are_fixed(finished_run):
    result, _ = finished_run
    text = result.log_file.read_text(encoding="utf-8")
    blocks = re.findall(r"Sample predictions:\n((?:.*\] \[INFO\]    [✓✗] .*\n)+)", text)
    assert len(blocks) == 2
    actual = [re.findall(r"[✓✗] '([^']*)' →", block) for block in blocks]
    assert actual[0] == actual[1]
    assert len(actual[0]) == 6


def test_epoch_line_format(finished_run):
    result, _ = finished_run
    lines = grep("Accuracy", result.log_file)
    epoch_lines = [line for line in lines if " - Train Loss: " in line]
    assert len(epoch_lines) == 2
    pattern = (
        r"Epoch \d+/2 - Train Loss: \d+\.\d{4}, Val Loss: \d+\.\d{4}, Accuracy: \d\.\d{4} "
        r"\(\d+\.\d%\), CER: \d\.\d{4}, Time: \d+\.\ds, LR: \d\.\d{2}e[-+]\d{2}$"
    )
    for line in epoch_lines:
        assert re.search(pattern, line), line


def test_documented_greps_find_lines(finished_run):
    result, output = finished_run
    logs = sorted((output / "logs").glob("training_*.log"))
    assert logs == [result.log_file]
    assert len(grep("TRAINING SUMMARY", *logs)) == 1
    final = grep("Final accuracy", *logs)
    assert len(final) == 1
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert f"{metrics[-1]['val_accuracy']:.4f}" in final[0]


def test_learning_rate_reduced_line(generated_folder, tmp_path, monkeypatch):
    from captcha_ocr.training.loop import Trainer

    original = Trainer._validate

    def flat_loss(self):
        # A validation loss that never improves makes ReduceLROnPlateau act at patience 0.
        return {**original(self), "val_loss": 1.0}

    monkeypatch.setattr(Trainer, "_validate", flat_loss)
    config = _tiny_config(generated_folder, tmp_path, epochs=3, lr_patience=0, lr_factor=0.5, lr=1e-3, decay_fraction=0.0)
    result = train(config, console=False, progress=False)
    assert result.status == "completed", result.error
    reduced = grep("Learning rate reduced", result.log_file)
    assert len(reduced) == 2
    assert reduced[0].endswith("Learning rate reduced: 1.00e-03 → 5.00e-04")
    assert reduced[1].endswith("Learning rate reduced: 5.00e-04 → 2.50e-04")
    epoch_lines = grep("Epoch 3/3 - Train Loss", result.log_file)
    # The epoch line shows the rate the epoch trained with, before the reduction after it.
    assert epoch_lines[0].endswith("LR: 5.00e-04")


def test_console_matches_file(generated_folder, tmp_path, capsys):
    config = _tiny_config(generated_folder, tmp_path, epochs=1)
    result = train(config, console=True, progress=False)
    err = capsys.readouterr().err.splitlines()
    file_lines = result.log_file.read_text(encoding="utf-8").splitlines()
    assert err == file_lines


def test_model_file_predicts_after_reload(finished_run, generated_folder):
    result, _ = finished_run
    recognizer = Recognizer.load(result.model_path)
    image = sorted(generated_folder.glob("*.png"))[0]
    prediction = recognizer.predict(image)
    assert isinstance(prediction.text, str)
    assert set(prediction.text) <= set("0123456789")
    assert 0.0 <= prediction.confidence <= 1.0
    assert recognizer.metadata["alphabet"] == "0123456789"
    batch = recognizer.predict_batch(sorted(generated_folder.glob("*.png"))[:5])
    assert len(batch) == 5
    assert batch[0].text == prediction.text
    # A batch takes other float32 kernels than one image, so the last digits may differ.
    assert batch[0].confidence == pytest.approx(prediction.confidence, rel=1e-5)


def test_fine_head_switch_is_logged_and_saved(generated_folder, tmp_path):
    config = _tiny_config(generated_folder, tmp_path, epochs=2, fine_head_at=0.0, warmup_steps=100)
    result = train(config, console=False, progress=False)
    assert result.status == "completed", result.error
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    # The warm-up starts again at the switch, so epoch 2 ends at the rate epoch 1 ended at.
    assert rows[1]["lr"] == pytest.approx(rows[0]["lr"])
    assert rows[0]["lr"] < config.lr / 2
    starts = grep("Training starts on the coarse head", result.log_file)
    assert starts[0].endswith("Training starts on the coarse head (8 steps) until validation accuracy reaches 0.00")
    switched = grep("Output head switched", result.log_file)
    assert len(switched) == 1
    assert "coarse (8 steps) → fine (16 steps)" in switched[0]
    # The switch follows the first epoch's line and comes before the second.
    lines = result.log_file.read_text(encoding="utf-8").splitlines()
    position = lines.index(switched[0])
    assert "Epoch 1/2 - Train Loss" in lines[position - 1]
    assert Recognizer.load(result.model_path).backend.model.fine_active


def test_fine_head_off_below_threshold(finished_run):
    result, _ = finished_run
    # Two epochs of a tiny model stay far below the default threshold of 0.3.
    assert grep("Output head switched", result.log_file) == []
    assert not Recognizer.load(result.model_path).backend.model.fine_active


def test_augmentation_waits_for_accuracy_by_default(finished_run):
    from captcha_ocr.checkpoint import load_checkpoint

    result, _ = finished_run
    assert grep("Augmentation: on, from validation accuracy 0.3000", result.log_file)
    # Two epochs of a tiny model stay below 0.3, so augmentation never starts.
    assert grep("Augmentation starts", result.log_file) == []
    assert load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["train_state"]["augmenting"] is False


def test_augmentation_starts_after_threshold_epoch(generated_folder, tmp_path, monkeypatch):
    from captcha_ocr.training import loop

    augmented_in_epoch: list[int] = []
    real_augment, real_train_epoch, real_validate = loop.augment, loop.Trainer._train_epoch, loop.Trainer._validate

    def counting_augment(images, generator, background):
        augmented_in_epoch[-1] += 1
        return real_augment(images, generator, background)

    def train_epoch(self, epoch):
        augmented_in_epoch.append(0)
        return real_train_epoch(self, epoch)

    def validate_as_if_reading(self):
        # Report an accuracy above the threshold, which a tiny model does not reach by itself.
        return {**real_validate(self), "val_accuracy": 0.5}

    monkeypatch.setattr(loop, "augment", counting_augment)
    monkeypatch.setattr(loop.Trainer, "_train_epoch", train_epoch)
    monkeypatch.setattr(loop.Trainer, "_validate", validate_as_if_reading)
    result = train(_tiny_config(generated_folder, tmp_path, epochs=2), console=False, progress=False)
    assert result.status == "completed", result.error
    assert augmented_in_epoch[0] == 0
    assert augmented_in_epoch[1] > 0
    started = grep("Augmentation starts", result.log_file)
    assert len(started) == 1
    assert started[0].endswith("Augmentation starts: validation accuracy 0.5000 reached 0.3000")
    # Logged after the first epoch's line, before the second's.
    text = result.log_file.read_text(encoding="utf-8")
    assert text.index("Epoch 1/2 - Train Loss") < text.index(started[0]) < text.index("Epoch 2/2 - Train Loss")


def test_augmentation_from_the_first_step(generated_folder, tmp_path):
    result = train(_tiny_config(generated_folder, tmp_path, epochs=1, augment_from=0.0), console=False, progress=False)
    assert result.status == "completed", result.error
    assert [line.split("] ", 2)[2] for line in grep("Augmentation:", result.log_file)] == ["Augmentation: on"]


def test_presence_loss_logged_by_default(finished_run):
    result, _ = finished_run
    assert grep("Character-presence loss: weight 1.0, on the coarse head", result.log_file)


def test_reading_lengths_logged_and_saved(finished_run):
    result, _ = finished_run
    assert grep("Reading lengths: 4 characters, the label lengths of the training set", result.log_file)
    assert Recognizer.load(result.model_path).label_lengths == [4]
    assert Recognizer.load(result.model_path, any_length=True).label_lengths is None


def test_presence_loss_off_is_logged(generated_folder, tmp_path):
    config = _tiny_config(generated_folder, tmp_path, epochs=1, presence_weight=0.0)
    result = train(config, console=False, progress=False)
    assert result.status == "completed", result.error
    assert grep("Character-presence loss: off", result.log_file)


def test_any_reading_length_is_logged(generated_folder, tmp_path):
    config = _tiny_config(generated_folder, tmp_path, epochs=1, keep_lengths=False)
    result = train(config, console=False, progress=False)
    assert result.status == "completed", result.error
    assert grep("Reading lengths: any", result.log_file)
    assert Recognizer.load(result.model_path).label_lengths is None


def test_labels_too_long_for_coarse_head_start_fine(tmp_path):
    from captcha_ocr.data.generate import GenerateSettings, generate

    folder = tmp_path / "long"
    settings = GenerateSettings(count=24, min_length=10, max_length=10, charset="digits", width=200, seed=3)
    generate(folder, settings, progress=False)
    config = _tiny_config(folder, tmp_path / "out", epochs=1)
    result = train(config, console=False, progress=False)
    assert result.status == "completed", result.error
    # Ten characters need more than the coarse head's 8 steps, so the fine head reads from the start.
    assert grep("Training starts on the coarse head", result.log_file) == []
    assert grep("Output head switched", result.log_file) == []
    assert Recognizer.load(result.model_path).backend.model.fine_active


def test_checkpoints_keep_average_and_trained_weights(finished_run):
    from captcha_ocr.checkpoint import load_checkpoint

    result, _ = finished_run
    last = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")
    assert last["ema_updates"] > 1
    averaged, trained = last["model_state"], last["training_model_state"]
    assert averaged.keys() == trained.keys()
    # The average lags the trained weights, so the two differ after a few steps.
    assert not torch.equal(averaged["classifier.weight"], trained["classifier.weight"])
    model_file = load_checkpoint(result.model_path)
    assert "training_model_state" not in model_file
    assert "ema_updates" not in model_file


def test_weight_average_off_saves_trained_weights(generated_folder, tmp_path):
    from captcha_ocr.checkpoint import load_checkpoint

    config = _tiny_config(generated_folder, tmp_path, epochs=1, ema_decay=0.0)
    result = train(config, console=False, progress=False)
    assert result.status == "completed", result.error
    assert grep("Weight average: off", result.log_file)
    last = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")
    for key, value in last["model_state"].items():
        assert torch.equal(value, last["training_model_state"][key]), key


def test_final_decay_takes_over_the_rate(generated_folder, tmp_path):
    config = _tiny_config(generated_folder, tmp_path, epochs=5, lr=1e-3, min_lr=1e-5, decay_fraction=0.4, lr_patience=100)
    result = train(config, console=False, progress=False)
    assert result.status == "completed", result.error
    decay = grep("Final learning-rate decay", result.log_file)
    assert len(decay) == 1
    assert decay[0].endswith("1.00e-03 → 1.00e-05 linearly over the last 40% of training, from epoch 4")
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [row["lr"] for row in rows]
    assert rates[:3] == [pytest.approx(1e-3)] * 3
    assert 1e-5 < rates[4] < rates[3] < 1e-3
    reduced = grep("Learning rate reduced", result.log_file)
    assert len(reduced) == 2
    assert all(line.endswith("(final linear decay)") for line in reduced)


def test_resumed_run_logs_switches_already_made(generated_folder, tmp_path):
    config = _tiny_config(generated_folder, tmp_path, epochs=1, augment_from=0.0, fine_head_at=0.0)
    first = train(config, console=False, progress=False)
    assert first.status == "completed", first.error
    resumed = train(config, resume=first.session_id, overrides={"epochs": 2}, console=False, progress=False)
    assert resumed.status == "completed", resumed.error
    assert [line.split("] ", 2)[2] for line in grep("Resumed ", resumed.log_file)] == [
        "Resumed output head: fine",
        "Resumed augmentation: started",
    ]
