"""Reading shifted views of each image and combining their readings."""

from __future__ import annotations

import numpy as np
import pytest

from captcha_ocr.charset import Codec
from captcha_ocr.cli import main
from captcha_ocr.data.images import is_image_file
from captcha_ocr.predict import DEFAULT_VIEWS, MAX_VIEWS, Recognizer, combine_views, shifted_views


def test_views_shift_alternately_and_fill_white():
    pixels = np.arange(2 * 2 * 8, dtype=np.uint8).reshape(2, 2, 8)
    stacked = shifted_views(pixels, 5, shift=2)
    assert stacked.shape == (10, 2, 8)
    np.testing.assert_array_equal(stacked[0:2], pixels)
    np.testing.assert_array_equal(stacked[2:4, :, 2:], pixels[:, :, :-2])
    np.testing.assert_array_equal(stacked[4:6, :, :-2], pixels[:, :, 2:])
    np.testing.assert_array_equal(stacked[6:8, :, 4:], pixels[:, :, :-4])
    np.testing.assert_array_equal(stacked[8:10, :, :-4], pixels[:, :, 4:])
    assert (stacked[2:4, :, :2] == 255).all()
    assert (stacked[4:6, :, -2:] == 255).all()


def test_views_wider_shift_than_image_is_white():
    assert (shifted_views(np.zeros((1, 2, 3), dtype=np.uint8), 2, shift=5)[1] == 255).all()


@pytest.mark.parametrize("views", [0, -1, 1.5, True, "3", MAX_VIEWS + 1, 100_000])
def test_invalid_view_counts_are_refused(views):
    with pytest.raises(ValueError, match=f"views must be a whole number from 1 to {MAX_VIEWS}"):
        shifted_views(np.zeros((1, 2, 3), dtype=np.uint8), views)


def test_numpy_integer_view_count_is_accepted():
    assert shifted_views(np.zeros((1, 2, 3), dtype=np.uint8), np.int64(2)).shape == (2, 2, 3)


def _three_views(first: list[float], second: list[float], third: list[float]) -> np.ndarray:
    """Log-probabilities (2 steps, 3 views of one image, blank/a/b): the given first step, then a sure blank."""
    probs = np.array([[first, second, third], [[0.9, 0.05, 0.05]] * 3])
    return np.log(probs)


def _combine(log_probs: np.ndarray) -> tuple[str, float]:
    codec = Codec("ab")
    readings = codec.decode_log_probs(log_probs)
    (prediction,) = combine_views(log_probs, readings, codec, views=3)
    return prediction.text, prediction.confidence


def test_combine_agreeing_views_mean_confidence():
    text, confidence = _combine(_three_views([0.1, 0.8, 0.1], [0.1, 0.7, 0.2], [0.1, 0.6, 0.3]))
    assert text == "a"
    assert confidence == pytest.approx((0.8 + 0.7 + 0.6) / 3)


def test_combine_prefers_probability_over_votes():
    # One view is sure of "a"; two lean to "b" by a hair, and give "a" nearly as much.
    log_probs = _three_views([0.02, 0.96, 0.02], [0.04, 0.47, 0.49], [0.04, 0.47, 0.49])
    text, confidence = _combine(log_probs)
    assert text == "a"
    assert confidence == pytest.approx(0.96 / 3)


def test_combine_probable_majority_wins():
    text, confidence = _combine(_three_views([0.05, 0.5, 0.45], [0.05, 0.35, 0.6], [0.05, 0.4, 0.55]))
    assert text == "b"
    assert confidence == pytest.approx((0.6 + 0.55) / 3)


def _val_paths(folder):
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def test_recognizer_blank_image_same_in_all_views(tiny_trained_model):
    # A white image looks the same shifted, so all views read what one view reads.
    single = Recognizer.load(tiny_trained_model.model, device="cpu", views=1)
    several = Recognizer.load(tiny_trained_model.model, device="cpu")
    assert several.views == DEFAULT_VIEWS == 3
    white = np.full((1, single.preprocessing.height, single.preprocessing.width), 255, dtype=np.uint8)
    (once,), (thrice,) = single.predict_pixels(white), several.predict_pixels(white)
    assert thrice.text == once.text
    assert thrice.confidence == pytest.approx(once.confidence)


def test_views_read_a_batch_in_order(tiny_trained_model):
    reader = Recognizer.load(tiny_trained_model.model, device="cpu", views=3)
    paths = _val_paths(tiny_trained_model.val_dir)
    together = reader.predict_batch(paths, batch_size=5)
    one_by_one = [reader.predict(path) for path in paths]
    assert [p.text for p in together] == [p.text for p in one_by_one]
    assert [p.confidence for p in together] == pytest.approx([p.confidence for p in one_by_one])


def test_recognizer_refuses_zero_views(tiny_trained_model):
    with pytest.raises(ValueError, match="views must be a whole number from 1 to 15, got 0"):
        Recognizer.load(tiny_trained_model.model, device="cpu", views=0)


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("views", ["0", "16", "100000"])
def test_cli_refuses_views_out_of_range(tiny_trained_model, command, views, capsys):
    with pytest.raises(SystemExit) as raised:
        main([command, str(tiny_trained_model.model), str(tiny_trained_model.val_dir), "--views", views])
    assert raised.value.code == 2
    assert f"--views: must be from 1 to 15, got {views}" in capsys.readouterr().err


def test_predict_prints_the_same_readings_as_the_recognizer(tiny_trained_model, capsys):
    paths = _val_paths(tiny_trained_model.val_dir)
    assert main(["predict", str(tiny_trained_model.model), str(tiny_trained_model.val_dir), "--views", "1", "--device", "cpu"]) == 0
    printed = [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()]
    expected = Recognizer.load(tiny_trained_model.model, device="cpu", views=1).predict_batch(paths)
    assert printed == [p.text for p in expected]
