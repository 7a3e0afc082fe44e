"""Training under torchrun on the CPU (Gloo): one record per run, the same numbers as one process."""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from captcha_ocr.checkpoint import load_checkpoint
from captcha_ocr.data.generate import GenerateSettings, generate
from captcha_ocr.data.images import load_image, to_model_input
from captcha_ocr.data.sources import DEFAULT_LABEL_PATTERN, collect
from captcha_ocr.metrics import character_error_rate, sequence_accuracy
from captcha_ocr.predict import Recognizer
from tests import process_support as proc

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="this PyTorch build has no Gloo backend for torch.distributed",
    ),
]

WARN_ON_RANK_ONE = """
import logging, os, sys
from captcha_ocr.cli import main
from captcha_ocr.training.loop import Trainer

fit = Trainer.fit

def fit_with_a_warning(self):
    if os.environ["RANK"] == "1":
        logging.getLogger("captcha_ocr.training.loop").warning("only rank 1 says this")
    return fit(self)

Trainer.fit = fit_with_a_warning
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def folders(generated_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """48 training images and a separate validation folder of 12."""
    root = tmp_path_factory.mktemp("distributed")
    shutil.copytree(generated_folder, root / "train")
    generate(root / "val", GenerateSettings(count=12, seed=21), progress=False)
    return root / "train", root / "val"


@pytest.fixture(scope="module")
def larger_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("distributed-larger")
    generate(folder, GenerateSettings(count=160, width=96, height=32, seed=12), progress=False)
    return folder


@pytest.fixture(scope="module")
def two_process_run(folders, tmp_path_factory):
    train_folder, val_folder = folders
    work = tmp_path_factory.mktemp("torchrun")
    output = work / "out"
    completed = proc.run(
        proc.torchrun(2, "train", str(train_folder), "--val", str(val_folder), *proc.TINY_FLAGS,
                      "--epochs", "2", "--output-dir", str(output)),
        work, timeout=180,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return output, val_folder


def test_one_record_per_run(two_process_run):
    output, _ = two_process_run
    session_id, log_file, run_dir = proc.only_run(output)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert sorted(p.name for p in (output / "models").iterdir()) == [
        f"captcha_model_{session_id}.pth", "captcha_model_latest.pth",
    ]
    assert proc.metrics_epochs(run_dir) == [1, 2]
    assert proc.read_json(run_dir / "summary.json")["status"] == "completed"

    lines = [m for _, m in proc.messages(log_file)]
    assert not [line for line in lines if line.startswith("[rank ")]
    assert proc.logged_epochs(log_file) == [1, 2]
    for once in (
        f"Session ID: {session_id}", "CAPTCHA RECOGNITION TRAINING SESSION STARTED", "Configuration:",
        "DATA:", "STARTING TRAINING LOOP", "TRAINING SUMMARY:", "TRAIN/TEST SPLIT:",
    ):
        assert lines.count(once) == 1, once


def test_log_names_the_process_layout(two_process_run):
    output, _ = two_process_run
    _, log_file, _ = proc.only_run(output)
    lines = [m for _, m in proc.messages(log_file)]
    assert "World size: 2 (backend: gloo)" in lines
    assert "Batch size: 8 per process x 2 processes = 16" in lines
    for rank in (0, 1):
        (device,) = [line for line in lines if line.startswith(f"   Rank {rank} device: ")]
        assert device.endswith("/cpu")


def test_final_metrics_match_last_checkpoint(two_process_run):
    output, val_folder = two_process_run
    _, log_file, run_dir = proc.only_run(output)
    last = run_dir / "checkpoints" / "last.pt"
    recognizer = Recognizer.load(last, device="cpu")
    samples = collect([val_folder], label_pattern=DEFAULT_LABEL_PATTERN).samples
    labels = [s.label for s in samples]
    texts = [p.text for p in recognizer.predict_batch([s.path for s in samples])]
    accuracy = sequence_accuracy(labels, texts)
    cer = character_error_rate(labels, texts)
    loss = _validation_loss(recognizer, samples)

    final = proc.metrics_rows(run_dir)[-1]
    assert final["epoch"] == load_checkpoint(last)["epoch"] == 2
    assert final["val_count"] == len(samples)
    assert final["val_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert final["val_cer"] == pytest.approx(cer, abs=1e-12)
    # The loss reacts to every weight and BatchNorm statistic, not only to the argmax.
    assert final["val_loss"] == pytest.approx(loss, rel=1e-6)
    text = log_file.read_text(encoding="utf-8")
    assert f"Final accuracy: {accuracy:.4f} ({accuracy * 100:.1f}%)\n" in text
    assert f"Final character error rate: {cer:.4f}\n" in text


def _validation_loss(recognizer: Recognizer, samples) -> float:
    """Mean CTC loss per label character of the output head, as the training loop's validation computes it."""
    pixels = np.stack([load_image(s.path, recognizer.preprocessing) for s in samples])
    model = recognizer.backend.model
    with torch.inference_mode():
        coarse, fine = model(torch.from_numpy(to_model_input(pixels, recognizer.preprocessing)), both_heads=True)
    logits = fine if model.fine_active else coarse
    log_probs = logits.float().log_softmax(2)  # (T, N, C)
    steps, count = log_probs.shape[:2]
    targets = [torch.tensor(recognizer.codec.encode(s.label)) for s in samples]
    lengths = torch.tensor([len(t) for t in targets])
    losses = F.ctc_loss(
        log_probs, torch.cat(targets), torch.full((count,), steps, dtype=torch.long), lengths,
        blank=0, reduction="none",
    )
    return float((losses / lengths).mean())


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM cannot be sent to a process on Windows")
def test_sigterm_to_torchrun_then_resume(larger_set, tmp_path):
    output = tmp_path / "out"
    process = proc.start(
        proc.torchrun(2, "train", str(larger_set), *proc.TINY_FLAGS, "--epochs", "30", "--output-dir", str(output)),
        tmp_path,
    )
    run_dir = proc.wait_for_run(output, process, timeout=90)
    proc.wait_until(lambda: len(proc.metrics_epochs(run_dir)) >= 1, process, 120, "the first epoch")
    process.send_signal(signal.SIGTERM)
    code, output_text = proc.finish(process, timeout=120)
    assert code != 0, output_text

    session_id, log_file, _ = proc.only_run(output)
    completed = load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"]
    assert 1 <= completed < 30
    lines = [m for _, m in proc.messages(log_file)]
    assert f"TRAINING INTERRUPTED by SIGTERM after {completed} completed epochs" in lines
    assert lines[-1] == (
        f"Resume with: torchrun --nproc_per_node=2 -m captcha_ocr train --resume {session_id} --output-dir {output}"
    )
    assert proc.read_json(run_dir / "summary.json")["status"] == "interrupted"
    assert proc.logged_epochs(log_file) == list(range(1, completed + 1))

    # Resume with one more epoch; a warning logged by rank 1 alone must reach the file.
    driver = tmp_path / "warn_on_rank_one.py"
    driver.write_text(WARN_ON_RANK_ONE, encoding="utf-8")
    resumed = proc.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
         "train", "--resume", session_id, "--output-dir", str(output), "--epochs", str(completed + 1), "--no-progress"],
        tmp_path, timeout=180,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    found = proc.messages(log_file)
    assert [m for _, m in found].count("TRAINING RESUMED") == 1
    assert proc.logged_epochs(log_file) == list(range(1, completed + 2))
    assert proc.metrics_epochs(run_dir) == list(range(1, completed + 2))
    rank_lines = [(level, m) for level, m in found if m.startswith("[rank ")]
    assert rank_lines == [("WARNING", "[rank 1] only rank 1 says this")]
    assert proc.read_json(run_dir / "summary.json")["status"] == "completed"


def test_mixed_precision_is_refused_on_the_cpu(folders, tmp_path):
    train_folder, _ = folders
    output = tmp_path / "out"
    completed = proc.run(
        proc.torchrun(2, "train", str(train_folder), *proc.TINY_FLAGS, "--device", "cpu", "--precision", "bf16",
                      "--output-dir", str(output)),
        tmp_path, timeout=180,
    )
    assert completed.returncode != 0
    message = "captcha-ocr train: error: --precision bf16 is mixed precision for CUDA GPUs"
    assert completed.stderr.count(message) == 1, completed.stderr  # once, not once per rank
    assert "use --precision fp32 on the CPU" in completed.stderr
    # Refused before the session starts: no log file or run folder is left behind.
    assert not list(output.glob("logs/training_*.log"))
    assert not (output / "runs").exists() or not any((output / "runs").iterdir())
