import pytest
import torch

from captcha_ocr.config import TrainConfig
from captcha_ocr.data.images import Preprocessing
from captcha_ocr.data.prepare import DataError, prepare_data
from captcha_ocr.model import CRNN, ModelConfig, output_steps
from tests.conftest import CASES, require


@pytest.mark.parametrize(("height", "width"), [(32, 96), (48, 160), (64, 256)])
def test_output_shape_matches_steps(height, width):
    model = CRNN(ModelConfig(num_classes=11, height=height, width=width, channels=(4, 4, 8, 8, 8), rnn_hidden=8))
    logits = model(torch.zeros(3, 1, height, width))
    assert logits.shape == (output_steps(width), 3, 11)


def test_model_config_validates_height():
    with pytest.raises(ValueError, match="multiple of 16"):
        ModelConfig(num_classes=5, height=40)


def test_model_config_roundtrip():
    config = ModelConfig(num_classes=7, channels=(1, 2, 3, 4, 5))
    assert ModelConfig.from_dict(config.to_dict()) == config


def _config(tmp_path, data, **extra):
    return TrainConfig.build({"data": [str(data)], "output_dir": str(tmp_path), "val_split": 0.5, **extra})


def test_too_long_label_stops_with_named_file(tmp_path):
    folder = require(CASES / "too_long_label")
    config = _config(tmp_path, folder, width=128, val_split=0.0, val=[str(folder)])
    with pytest.raises(DataError) as raised:
        prepare_data(config, output_steps(128), Preprocessing(height=48, width=128), progress=False, warn=False)
    message = str(raised.value)
    assert "abcdefghijklmnopqrst.png" in message
    assert "20 characters" in message
    assert "emits only 8" in message
    assert "--width 320" in message
    assert "--too-long-labels skip" in message


def test_too_long_label_counts_repeats(tmp_path):
    folder = require(CASES / "repeated_chars")
    # "xxxxx" needs 9 steps; width 128 gives 8.
    config = _config(tmp_path, folder, width=128)
    with pytest.raises(DataError, match="xxxxx"):
        prepare_data(config, output_steps(128), Preprocessing(height=32, width=128), progress=False, warn=False)


def test_too_long_label_skip_mode(tmp_path):
    folder = require(CASES / "repeated_chars")
    config = _config(tmp_path, folder, width=128, too_long_labels="skip")
    prepared = prepare_data(config, output_steps(128), Preprocessing(height=32, width=128), progress=False, warn=False)
    skipped_names = [path.name for path, _ in prepared.skipped]
    assert skipped_names == ["xxxxx.png"]
    assert "needs 9 output steps" in prepared.skipped[0][1]
    assert len(prepared.train) + len(prepared.val) == 5
