"""Interrupted, killed and resumed trainings: checkpoints, the log and metrics.jsonl stay whole."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from captcha_ocr import checkpoint
from captcha_ocr.checkpoint import CheckpointError, load_checkpoint, save_atomic
from captcha_ocr.config import TrainConfig
from captcha_ocr.data.generate import GenerateSettings, generate
from captcha_ocr.session import train
from tests import process_support as proc


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 generated CAPTCHAs: enough that an epoch lasts long enough to be interrupted in."""
    folder = tmp_path_factory.mktemp("resume-images")
    generate(folder, GenerateSettings(count=160, width=96, height=32, seed=11), progress=False)
    return folder


@pytest.fixture(scope="module")
def small_images(generated_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("resume-small") / "images"
    shutil.copytree(generated_folder, folder)
    return folder


def tiny(data: Path, output: Path, **settings) -> TrainConfig:
    return TrainConfig.build({"data": [str(data)], "output_dir": str(output), **proc.TINY_SETTINGS, **settings})


def _start_training(images: Path, output: Path, cwd: Path, epochs: int):
    command = proc.cli("train", str(images), *proc.TINY_FLAGS, "--epochs", str(epochs), "--output-dir", str(output))
    return proc.start(command, cwd)


# ---------------------------------------------------------------- signals


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT and SIGTERM cannot be sent to a process on Windows")
@pytest.mark.parametrize(
    ("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_signal_mid_epoch_finishes_cleanly(images, tmp_path, signum, exit_code):
    output = tmp_path / "out"
    process = _start_training(images, output, tmp_path, epochs=50)
    run_dir = proc.wait_for_run(output, process)
    proc.wait_until(lambda: len(proc.metrics_epochs(run_dir)) >= 1, process, 90, "the first epoch")
    process.send_signal(signum)
    code, output_text = proc.finish(process)

    assert code == exit_code, output_text
    assert "Traceback" not in output_text
    session_id, log_file, _ = proc.only_run(output)
    completed = load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"]
    assert 1 <= completed < 50
    assert proc.logged_epochs(log_file) == list(range(1, completed + 1))
    assert proc.metrics_epochs(run_dir) == list(range(1, completed + 1))

    lines = [m for _, m in proc.messages(log_file)]
    name = signal.Signals(signum).name
    assert f"TRAINING INTERRUPTED by {name} after {completed} completed epochs" in lines
    assert f"Checkpoint of the last completed epoch: {run_dir / 'checkpoints' / 'last.pt'}" in lines
    assert lines[-1] == f"Resume with: captcha-ocr train --resume {session_id} --output-dir {output}"

    summary = proc.read_json(run_dir / "summary.json")
    assert summary["status"] == "interrupted"
    assert summary["exit_code"] == exit_code
    assert summary["stop_reason"] == f"interrupted by {name}"
    assert summary["epochs_completed"] == completed


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL does not exist on Windows")
def test_killed_run_resumes_where_it_stopped(images, tmp_path):
    output = tmp_path / "out"
    process = _start_training(images, output, tmp_path, epochs=4)
    run_dir = proc.wait_for_run(output, process)
    proc.wait_until(lambda: len(proc.metrics_epochs(run_dir)) >= 2, process, 90, "two epochs")
    process.send_signal(signal.SIGKILL)
    proc.finish(process)
    session_id, log_file, _ = proc.only_run(output)
    saved_epoch = load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"]
    assert 2 <= saved_epoch < 4

    resumed = proc.run(
        proc.cli("train", "--resume", session_id, "--output-dir", str(output), "--no-progress", "--batch-size", "4"),
        tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr

    session_id_again, log_again, _ = proc.only_run(output)
    assert (session_id_again, log_again) == (session_id, log_file)
    lines = [m for _, m in proc.messages(log_file)]
    started = lines.index("CAPTCHA RECOGNITION TRAINING SESSION STARTED")
    resumed_at = lines.index("TRAINING RESUMED")
    assert started < resumed_at
    assert lines.count("TRAINING RESUMED") == 1
    assert f"Resuming from {run_dir / 'checkpoints' / 'last.pt'} after epoch {saved_epoch}" in lines
    assert proc.logged_epochs(log_file) == [1, 2, 3, 4]
    assert proc.metrics_epochs(run_dir) == [1, 2, 3, 4]
    # The run keeps the batch size it was trained with, and a warning names the ignored flag.
    (ignored,) = [m for level, m in proc.messages(log_file) if level == "WARNING"]
    assert ignored.startswith("Ignored on resume, the run keeps the values it was trained with: --batch-size (")
    assert lines[resumed_at:].count("Batch size: 8 per process x 1 process = 8") == 1
    # The tiny model stays below 30% validation accuracy, so neither switch has happened.
    assert lines[resumed_at:].count("Resumed output head: coarse") == 1
    assert lines[resumed_at:].count("Resumed augmentation: not started yet") == 1
    assert "Resumed output head: coarse" not in lines[:resumed_at]

    summary = proc.read_json(run_dir / "summary.json")
    assert summary["status"] == "completed"
    assert summary["epochs_completed"] == 4
    assert len(summary["sessions"]) == 2


# ----------------------------------------------------------- restored state


def test_resumed_run_matches_an_uninterrupted_one(small_images, tmp_path):
    """Weights, optimizer, scheduler, random states and the best metric all carry over."""
    # Raising --epochs on resume moves the final decay, so it is off here.
    straight = train(tiny(small_images, tmp_path / "straight", epochs=3, decay_fraction=0.0), console=False, progress=False)
    first = train(tiny(small_images, tmp_path / "split", epochs=2, decay_fraction=0.0), console=False, progress=False)
    assert straight.status == first.status == "completed"
    second = train(
        tiny(small_images, tmp_path / "split", epochs=2, decay_fraction=0.0), resume=first.session_id,
        overrides={"epochs": 3}, console=False, progress=False,
    )
    assert second.status == "completed", second.error
    assert second.session_id == first.session_id

    expected = proc.metrics_rows(straight.run_dir)
    got = proc.metrics_rows(second.run_dir)
    assert [r["epoch"] for r in got] == [1, 2, 3]
    for key in ("train_loss", "val_loss", "val_cer", "val_accuracy", "lr"):
        assert got[2][key] == pytest.approx(expected[2][key], rel=1e-5, abs=1e-7), key

    a = load_checkpoint(straight.run_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(second.run_dir / "checkpoints" / "last.pt")
    for name, tensor in a["model_state"].items():
        assert torch.allclose(tensor.float(), b["model_state"][name].float(), atol=1e-6), name
    assert a["scheduler_state"] == b["scheduler_state"]
    assert a["optimizer_state"]["state"].keys() == b["optimizer_state"]["state"].keys()
    for index, state in a["optimizer_state"]["state"].items():
        assert torch.allclose(state["exp_avg"], b["optimizer_state"]["state"][index]["exp_avg"], atol=1e-6)
    for key in ("best_accuracy", "best_val_loss", "best_epoch", "global_step", "stale_epochs"):
        assert a["train_state"][key] == pytest.approx(b["train_state"][key], rel=1e-5), key


def test_resume_repairs_cut_record(small_images, tmp_path):
    """A kill right after a checkpoint was saved leaves its epoch out of the log and metrics."""
    first = train(tiny(small_images, tmp_path, epochs=2), console=False, progress=False)
    assert first.status == "completed"
    log_lines = first.log_file.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = next(i for i, line in enumerate(log_lines) if "] Epoch 2/2 - Sample predictions" in line)
    first.log_file.write_text("".join(log_lines[:cut]), encoding="utf-8")
    metrics = (first.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (first.run_dir / "metrics.jsonl").write_text(metrics[0], encoding="utf-8")

    second = train(
        tiny(small_images, tmp_path, epochs=2), resume=first.session_id, overrides={"epochs": 3},
        console=False, progress=False,
    )
    assert second.status == "completed", second.error
    assert proc.logged_epochs(second.log_file) == [1, 2, 3]
    assert proc.metrics_epochs(second.run_dir) == [1, 2, 3]
    assert any(m.endswith("(restored from the checkpoint)") for _, m in proc.messages(second.log_file))


def _save_with_cuda_locations(payload: dict, path: Path, monkeypatch) -> None:
    """Write ``payload`` as a GPU training run would: every storage tagged 'cuda:0'."""
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(payload, path)


def test_gpu_checkpoint_resumes_on_cpu(small_images, tmp_path, monkeypatch):
    first = train(tiny(small_images, tmp_path, epochs=1), console=False, progress=False)
    assert first.status == "completed"
    last = first.run_dir / "checkpoints" / "last.pt"
    _save_with_cuda_locations(load_checkpoint(last), last, monkeypatch)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(last, weights_only=True)

    payload = load_checkpoint(last)
    tensors = [t for t in payload["model_state"].values()] + [payload["rng"]["torch"]]
    assert all(t.device.type == "cpu" for t in tensors)

    second = train(
        tiny(small_images, tmp_path, epochs=1), resume=first.session_id, overrides={"epochs": 2, "device": "cpu"},
        console=False, progress=False,
    )
    assert second.status == "completed", second.error
    assert proc.metrics_epochs(second.run_dir) == [1, 2]


def test_older_checkpoint_resumes_without_presence_loss(small_images, tmp_path):
    first = train(tiny(small_images, tmp_path, epochs=1), console=False, progress=False)
    assert first.status == "completed", first.error
    last = first.run_dir / "checkpoints" / "last.pt"
    payload = load_checkpoint(last)
    del payload["train_config"]["presence_weight"]
    del payload["train_config"]["keep_lengths"]
    save_atomic(payload, last)

    second = train(
        tiny(small_images, tmp_path, epochs=1), resume=first.session_id, overrides={"epochs": 2},
        console=False, progress=False,
    )
    assert second.status == "completed", second.error
    log = second.log_file.read_text(encoding="utf-8")
    assert "Character-presence loss: off" in log
    assert "Reading lengths: any" in log
    saved = load_checkpoint(last)
    assert saved["train_config"]["presence_weight"] == 0.0
    assert saved["train_config"]["keep_lengths"] is False
    assert saved["label_lengths"] is None


def test_resume_warning_names_the_switch_given(small_images, tmp_path):
    first = train(tiny(small_images, tmp_path, epochs=1), console=False, progress=False)
    assert first.status == "completed", first.error
    second = train(
        tiny(small_images, tmp_path, epochs=1), resume=first.session_id,
        overrides={"epochs": 2, "keep_lengths": False}, console=False, progress=False,
    )
    assert second.status == "completed", second.error
    log = second.log_file.read_text(encoding="utf-8")
    assert "Ignored on resume, the run keeps the values it was trained with: --no-keep-lengths (" in log
    assert "Reading lengths: 4 characters" in log


# ------------------------------------------------------------ atomic writes


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_atomic({"kind": "training", "epoch": 1}, path)

    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: (replaced.append((Path(a), Path(b))), real_replace(a, b)))
    save_atomic({"kind": "training", "epoch": 2}, path)
    ((temporary, target),) = replaced
    assert target == path
    assert temporary.parent == path.parent
    assert temporary != path

    def write_half_then_fail(payload, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_atomic({"kind": "training", "epoch": 3}, path)
    assert load_checkpoint(path)["epoch"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_truncated_checkpoint_is_reported(tmp_path):
    path = save_atomic({"kind": "training", "epoch": 1, "weights": torch.ones(1000)}, tmp_path / "last.pt")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)
