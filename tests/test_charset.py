import itertools
from pathlib import Path

import numpy as np
import pytest

from captcha_ocr.charset import (
    BLANK_INDEX,
    Codec,
    best_paths_of_length,
    min_ctc_steps,
    resolve_charset,
    text_log_likelihood,
)
from tests.conftest import CASES, require


def one_hot_path(codec: Codec, path: list[int]) -> np.ndarray:
    """Build (T, 1, C) probabilities whose best path is ``path``."""
    probs = np.full((len(path), 1, codec.num_classes), 0.01, dtype=np.float32)
    for step, index in enumerate(path):
        probs[step, 0, index] = 0.9
    return probs


def test_encode_decode_roundtrip():
    codec = Codec("0123456789")
    assert codec.encode("907") == [10, 1, 8]
    assert codec.decode_indices([10, 1, 8]) == "907"


def test_decode_collapses_repeats_before_blanks():
    codec = Codec("6")
    six = codec.encode("6")[0]
    path = [six, six, BLANK_INDEX, six, BLANK_INDEX, six, six, BLANK_INDEX, six]
    assert codec.decode_indices(path) == "6666"


def test_decode_merges_adjacent_repeats():
    codec = Codec("ab")
    a, b = codec.encode("ab")
    assert codec.decode_indices([a, a, a, b, b]) == "ab"
    assert codec.decode_indices([BLANK_INDEX, BLANK_INDEX]) == ""


@pytest.mark.parametrize("label", ["6666", "aabb", "5bbzt", "xxxxx", "ZZ9ZZ", "1oo1"])
def test_repeated_labels_decode_exactly(label):
    codec = Codec.from_labels([label])
    path: list[int] = []
    for char in label:
        index = codec.encode(char)[0]
        if path and path[-1] == index:
            path.append(BLANK_INDEX)
        path += [index, index]
    assert codec.decode_indices(path) == label
    (text, confidence), = codec.decode(one_hot_path(codec, path))
    assert text == label
    assert 0.0 < confidence <= 1.0


def test_repeated_chars_case_files_match_labels():
    folder = require(CASES / "repeated_chars")
    labels = sorted(Path(p).stem for p in folder.glob("*.png"))
    assert labels == sorted(["6666", "aabb", "5bbzt", "xxxxx", "ZZ9ZZ", "1oo1"])


def test_min_ctc_steps_counts_repeats():
    assert min_ctc_steps("abcd") == 4
    assert min_ctc_steps("6666") == 7
    assert min_ctc_steps("aabb") == 6
    assert min_ctc_steps("") == 0


def test_confidence_of_empty_read_is_blank_probability():
    codec = Codec("ab")
    (text, confidence), = codec.decode(one_hot_path(codec, [BLANK_INDEX] * 3))
    assert text == ""
    assert confidence == pytest.approx(0.9)


def test_encode_rejects_unknown_character():
    with pytest.raises(ValueError, match="outside the alphabet"):
        Codec("abc").encode("abz")


def test_codec_rejects_duplicates():
    with pytest.raises(ValueError, match="repeated"):
        Codec("aab")


def test_resolve_named_and_literal_charsets():
    assert resolve_charset("digits") == "0123456789"
    assert resolve_charset("digits+XY") == "0123456789XY"
    assert len(resolve_charset("alnum")) == 62
    assert resolve_charset("cab") == "abc"
    with pytest.raises(ValueError):
        resolve_charset("")


def test_unknown_chars_in_order():
    assert Codec("abc").unknown_chars("axbyx") == "xy"


def _collapsed_length(path) -> int:
    return len(Codec("abc").decode_indices(path))


def test_length_search_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(60):
        steps, classes = int(rng.integers(1, 6)), int(rng.integers(2, 5))
        log_probs = np.log(rng.dirichlet(np.ones(classes), size=(steps, 2)))
        lengths = {int(n) for n in rng.choice(4, size=int(rng.integers(1, 3)))}
        paths, found = best_paths_of_length(log_probs, lengths)
        for n in range(2):
            scores = [
                sum(log_probs[t, n, c] for t, c in enumerate(path))
                for path in itertools.product(range(classes), repeat=steps)
                if _collapsed_length(path) in lengths
            ]
            assert found[n] == bool(scores)
            if scores:
                assert _collapsed_length(paths[:, n]) in lengths
                assert sum(log_probs[t, n, c] for t, c in enumerate(paths[:, n])) == pytest.approx(max(scores))


@pytest.mark.parametrize("text", [[], [1], [1, 1], [1, 2], [2, 1, 2], [1, 1, 1]])
def test_text_likelihood_sums_all_paths(text):
    rng = np.random.default_rng(len(text))
    steps, classes = 5, 3
    log_probs = np.log(rng.dirichlet(np.ones(classes), size=(steps, 2)))
    got = text_log_likelihood(log_probs, text)
    codec = Codec("ab")
    expected_text = "".join(codec.alphabet[i - 1] for i in text)
    for n in range(2):
        total = sum(
            np.exp(sum(log_probs[t, n, c] for t, c in enumerate(path)))
            for path in itertools.product(range(classes), repeat=steps)
            if codec.decode_indices(path) == expected_text
        )
        if total:
            assert got[n] == pytest.approx(np.log(total))
        else:
            assert got[n] < -1e29


def test_text_likelihood_too_long_impossible():
    log_probs = np.log(np.full((2, 1, 3), 1 / 3))
    assert text_log_likelihood(log_probs, [1, 1])[0] < -1e29
    assert text_log_likelihood(log_probs[:0], [])[0] == 0.0


def test_kept_length_restores_merged_repeat():
    # The best path reads "g88x": the blank between the last two 8s is only second best.
    codec = Codec("8gx")
    eight, g, x = (codec.encode(c)[0] for c in "8gx")
    path = [g, BLANK_INDEX, eight, BLANK_INDEX, eight, eight, eight, x]
    probs = one_hot_path(codec, path)
    probs[5, 0, BLANK_INDEX] = 0.6
    probs[5, 0, eight] = 0.62
    probs /= probs.sum(axis=2, keepdims=True)
    (greedy_text, greedy_confidence), = codec.decode(probs)
    (kept_text, kept_confidence), = codec.decode(probs, lengths=[5])
    assert greedy_text == "g88x"
    assert kept_text == "g888x"
    assert 0.0 < kept_confidence < greedy_confidence


def test_kept_length_leaves_allowed_readings_alone():
    codec = Codec("ab")
    a, b = codec.encode("ab")
    probs = one_hot_path(codec, [a, BLANK_INDEX, b, b])
    assert codec.decode(probs, lengths=[2, 4]) == codec.decode(probs)


def test_unreachable_length_keeps_best_path():
    codec = Codec("ab")
    a, b = codec.encode("ab")
    probs = one_hot_path(codec, [a, b])
    paths, found = best_paths_of_length(np.log(probs), [3])
    assert not found[0]
    assert codec.decode(probs, lengths=[3]) == codec.decode(probs)
    assert codec.decode(probs, lengths=[3])[0][0] == "ab"


def test_lengths_beyond_the_steps_are_dropped():
    codec = Codec("ab")
    a, b = codec.encode("ab")
    probs = one_hot_path(codec, [a, BLANK_INDEX, b])
    paths, found = best_paths_of_length(np.log(probs), [10**9])
    assert not found[0]
    assert codec.decode_indices(paths[:, 0]) == "ab"


def test_lengths_given_as_array():
    codec = Codec("ab")
    a, b = codec.encode("ab")
    probs = one_hot_path(codec, [a, a, b, b])
    assert len(codec.decode(probs, np.array([3]))[0][0]) == 3
    assert codec.decode(probs, np.array([], dtype=int)) == codec.decode(probs)


def test_no_steps_read_empty():
    (text, confidence), = Codec("ab").decode(np.zeros((0, 1, 3), dtype=np.float32), [2])
    assert text == ""
    assert confidence == 0.0


def test_confident_logits_keep_length():
    # Logits 110 apart make the losing classes' float32 probabilities exactly 0.
    from captcha_ocr.predict import log_softmax

    codec = Codec("138")
    code_1, code_3, code_8 = (codec.encode(c)[0] for c in "138")
    logits = np.full((6, 1, codec.num_classes), 0.0, dtype=np.float32)
    for step, index in enumerate([code_1, code_8, code_8, code_8, code_3, BLANK_INDEX]):
        logits[step, 0, index] = 120.0
    logits[:, 0, BLANK_INDEX] = np.maximum(logits[:, 0, BLANK_INDEX], 10.0)
    log_probs = log_softmax(logits.astype(np.float64), axis=2)
    (text, confidence), = codec.decode_log_probs(log_probs, lengths=[4])
    assert text == "1883"
    # The forced blank has probability e^-110, and the confidence reflects it.
    assert confidence < 1e-40
