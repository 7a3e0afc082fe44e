"""Whole-label accuracy, character error rate and confusions on predictions worked out by hand."""

import pytest

from captcha_ocr.metrics import (
    character_error_rate,
    character_errors,
    confusion_pairs,
    edit_distance,
    sequence_accuracy,
)

# One exact read, one substitution (c -> e), one deletion (3 dropped), one insertion (z added).
TRUTHS = ["abcd", "abcd", "1234", "xy"]
PREDICTIONS = ["abcd", "abed", "124", "xyz"]


def test_accuracy_whole_labels_only():
    assert sequence_accuracy(TRUTHS, PREDICTIONS) == 0.25
    # Every character is present, but not in order: no credit.
    assert sequence_accuracy(["ab"], ["ba"]) == 0.0
    # A read that collapses a doubled character is wrong as a whole.
    assert sequence_accuracy(["6666", "1234"], ["6", "1234"]) == 0.5


def test_character_errors_by_hand():
    assert [edit_distance(t, p) for t, p in zip(TRUTHS, PREDICTIONS, strict=True)] == [0, 1, 1, 1]
    assert character_errors(TRUTHS, PREDICTIONS) == (3, 14)
    assert character_error_rate(TRUTHS, PREDICTIONS) == pytest.approx(3 / 14)


def test_character_error_rate_can_exceed_one():
    # One true character, three read: one substitution and two insertions.
    assert character_error_rate(["a"], ["bcd"]) == 3.0
    # Swapping two characters costs two edits of the four characters.
    assert character_error_rate(["ab", "cd"], ["ba", "cd"]) == 0.5


def test_confusion_pair_kinds():
    pairs = confusion_pairs(TRUTHS, PREDICTIONS)
    assert pairs == {("c", "e"): 1, ("3", ""): 1, ("", "z"): 1}


def test_confusion_pairs_add_up():
    pairs = confusion_pairs(["aa", "aa", "ma"], ["ab", "bb", "na"])
    assert pairs == {("a", "b"): 3, ("m", "n"): 1}
    assert pairs.most_common(1) == [(("a", "b"), 3)]


def test_empty_sets_score_zero():
    assert sequence_accuracy([], []) == 0.0
    assert character_error_rate([], []) == 0.0
    assert confusion_pairs([], []) == {}


@pytest.mark.parametrize("function", [sequence_accuracy, character_errors, character_error_rate, confusion_pairs])
def test_mismatched_lengths_raise(function):
    with pytest.raises(ValueError, match="2 true labels but 1 predictions"):
        function(["ab", "cd"], ["ab"])
