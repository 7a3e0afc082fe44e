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
    assert "emits only 16" in message
    assert "--width 160" in message
    assert "--too-long-labels skip" in message


def test_too_long_label_counts_repeats(tmp_path):
    folder = require(CASES / "repeated_chars")
    # "xxxxx" needs 9 steps; width 64 gives 8.
    config = _config(tmp_path, folder, width=64)
    with pytest.raises(DataError, match="xxxxx"):
        prepare_data(config, output_steps(64), Preprocessing(height=32, width=64), progress=False, warn=False)


def test_too_long_label_skip_mode(tmp_path):
    folder = require(CASES / "repeated_chars")
    config = _config(tmp_path, folder, width=64, too_long_labels="skip")
    prepared = prepare_data(config, output_steps(64), Preprocessing(height=32, width=64), progress=False, warn=False)
    skipped_names = [path.name for path, _ in prepared.skipped]
    assert skipped_names == ["xxxxx.png"]
    assert "needs 9 output steps" in prepared.skipped[0][1]
    assert len(prepared.train) + len(prepared.val) == 5


def _small_model(**extra):
    config = ModelConfig(num_classes=11, height=32, width=128, channels=(4, 4, 8, 8, 8), rnn_hidden=8, **extra)
    return CRNN(config).eval()


def test_heads_have_coarse_and_fine_steps():
    model = _small_model()
    coarse, fine = model(torch.zeros(2, 1, 32, 128), both_heads=True)
    assert coarse.shape == (8, 2, 11)
    assert fine.shape == (16, 2, 11)


def test_coarse_output_repeats_each_step():
    model = _small_model()
    images = torch.randn(2, 1, 32, 128)
    coarse, _ = model(images, both_heads=True)
    output = model(images)
    assert not model.fine_active
    assert torch.equal(output[0::2], coarse)
    assert torch.equal(output[1::2], coarse)


def test_activated_fine_head_reads_like_coarse():
    model = _small_model()
    images = torch.randn(3, 1, 32, 128)
    before = model(images)
    model.activate_fine_head()
    after = model(images)
    assert model.fine_active
    assert torch.allclose(before, after, atol=1e-5)


def test_fine_head_flag_survives_state_dict():
    model = _small_model()
    model.activate_fine_head()
    restored = _small_model()
    restored.load_state_dict(model.state_dict())
    assert restored.fine_active


def test_model_without_fine_head_loads():
    # The layout of models saved before the fine head: one step per column and no flag buffer.
    old = _small_model(steps_per_column=1)
    state = {key: value for key, value in old.state_dict().items() if key != "fine_head_active"}
    values = old.config.to_dict()
    del values["steps_per_column"]
    restored = CRNN(ModelConfig.from_dict(values)).eval()
    restored.load_state_dict(state)
    images = torch.randn(2, 1, 32, 128)
    assert restored(images).shape == (output_steps(128, 1), 2, 11)
    assert torch.equal(restored(images), old(images))


def _peaked_logits(steps: list[int], num_classes: int = 6) -> torch.Tensor:
    """Logits (T, 1, C) that put each step's probability on one class."""
    logits = torch.full((len(steps), 1, num_classes), -8.0)
    for t, c in enumerate(steps):
        logits[t, 0, c] = 8.0
    return logits


def test_presence_loss_ignores_character_order():
    from captcha_ocr.training.loop import presence_loss

    targets, lengths = torch.tensor([1, 2, 3]), torch.tensor([3])
    right = presence_loss(_peaked_logits([0, 1, 0, 2, 3, 0]), targets, lengths)
    shuffled = presence_loss(_peaked_logits([3, 0, 2, 0, 1, 0]), targets, lengths)
    missing = presence_loss(_peaked_logits([0, 1, 0, 2, 0, 0]), targets, lengths)
    extra = presence_loss(_peaked_logits([0, 1, 4, 2, 3, 0]), targets, lengths)
    assert right.item() == pytest.approx(shuffled.item())
    assert right.item() < 0.01
    assert missing.item() > 1.0
    assert extra.item() > 1.0


def test_presence_loss_reaches_every_image():
    from captcha_ocr.training.loop import presence_loss

    logits = torch.zeros(4, 2, 6, requires_grad=True)
    presence_loss(logits, torch.tensor([1, 2, 5]), torch.tensor([2, 1])).backward()
    assert logits.grad is not None
    assert logits.grad[:, 0].abs().sum() > 0
    assert logits.grad[:, 1].abs().sum() > 0
