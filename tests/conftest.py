"""Shared fixtures: paths to the real data beside the checkout and tiny generated sets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
CASES = SHARED / "cases"
DATA = SHARED / "data"

# Settings that make a training run take seconds on a CPU.
TINY_MODEL = {
    "height": 32,
    "width": 128,
    "channels": [8, 8, 16, 16, 16],
    "rnn_hidden": 16,
    "rnn_layers": 1,
    "batch_size": 8,
    "warmup_steps": 0,
    "threads": 1,
}


def require(path: Path) -> Path:
    """Skip the calling test when the data folder beside the checkout is absent."""
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests read the real CAPTCHA data kept beside the checkout")
    return path


@pytest.fixture(scope="session")
def generated_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Forty-eight generated 4-digit CAPTCHAs with a labels.csv manifest."""
    from captcha_ocr.data.generate import GenerateSettings, generate

    folder = tmp_path_factory.mktemp("generated")
    generate(folder, GenerateSettings(count=48, charset="digits", seed=3), progress=False)
    return folder


@dataclass(frozen=True)
class TrainedModel:
    """A tiny trained model: its .pth file, run folder and separate validation folder."""

    model: Path
    run_dir: Path
    val_dir: Path


@pytest.fixture(scope="session")
def tiny_trained_model(generated_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """One epoch on the generated set, validated on twelve more generated images.

    Two recurrent layers, as in the default model, so that export covers stacked layers.
    """
    from captcha_ocr.config import TrainConfig
    from captcha_ocr.data.generate import GenerateSettings, generate
    from captcha_ocr.session import train

    root = tmp_path_factory.mktemp("tiny_trained")
    val_dir = root / "val"
    generate(val_dir, GenerateSettings(count=12, charset="digits", seed=11), progress=False)
    config = TrainConfig.build({
        "data": [str(generated_folder)], "val": [str(val_dir)], "output_dir": str(root / "outputs"),
        "epochs": 1, "threads": 1, **TINY_MODEL, "rnn_layers": 2,
    })
    result = train(config, console=False, progress=False)
    assert result.status == "completed", result.error
    return TrainedModel(result.model_path, result.run_dir, val_dir)


@pytest.fixture(scope="session")
def tiny_onnx_model(tiny_trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_trained_model`` exported to ONNX (and checked against PyTorch by the export)."""
    from captcha_ocr.export import export_onnx

    out = tmp_path_factory.mktemp("tiny_onnx") / "model.onnx"
    export_onnx(tiny_trained_model.model, out, verify_data=tiny_trained_model.val_dir)
    return out
