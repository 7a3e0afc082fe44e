"""Recognition metrics on plain strings: whole-label accuracy, character error rate, confusions."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein


def _check_lengths(truths: Sequence[str], predictions: Sequence[str]) -> None:
    if len(truths) != len(predictions):
        raise ValueError(f"got {len(truths)} true labels but {len(predictions)} predictions")


def sequence_accuracy(truths: Sequence[str], predictions: Sequence[str]) -> float:
    """Fraction of predictions equal to the whole true label; 0.0 for no samples."""
    _check_lengths(truths, predictions)
    if not truths:
        return 0.0
    return sum(t == p for t, p in zip(truths, predictions)) / len(truths)


def edit_distance(truth: str, prediction: str) -> int:
    return Levenshtein.distance(truth, prediction)


def character_errors(truths: Sequence[str], predictions: Sequence[str]) -> tuple[int, int]:
    """Return (total edit distance, total true characters) over a set."""
    _check_lengths(truths, predictions)
    errors = sum(edit_distance(t, p) for t, p in zip(truths, predictions))
    return errors, sum(len(t) for t in truths)


def character_error_rate(truths: Sequence[str], predictions: Sequence[str]) -> float:
    """Total edit distance divided by the total length of the true labels."""
    errors, characters = character_errors(truths, predictions)
    return errors / characters if characters else 0.0


def confusion_pairs(truths: Sequence[str], predictions: Sequence[str]) -> Counter[tuple[str, str]]:
    """Count (true character, predicted character) substitutions along the minimal edit path.

    Deletions appear as (char, '') and insertions as ('', char).
    """
    _check_lengths(truths, predictions)
    pairs: Counter[tuple[str, str]] = Counter()
    for truth, prediction in zip(truths, predictions):
        for op in Levenshtein.editops(truth, prediction):
            if op.tag == "replace":
                pairs[(truth[op.src_pos], prediction[op.dest_pos])] += 1
            elif op.tag == "delete":
                pairs[(truth[op.src_pos], "")] += 1
            elif op.tag == "insert":
                pairs[("", prediction[op.dest_pos])] += 1
    return pairs
