"""Shared fixtures: paths to the real data beside the checkout and tiny generated sets."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
CASES = SHARED / "cases"
DATA = SHARED / "data"

# Settings that make a training run take seconds on a CPU.
TINY_MODEL = {
    "height": 32,
    "width": 96,
    "channels": [8, 8, 16, 16, 16],
    "rnn_hidden": 16,
    "rnn_layers": 1,
    "batch_size": 8,
    "warmup_steps": 0,
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
