"""The CTC codec: alphabet, blank index, label encoding and greedy decoding.

The codec works on plain Python and NumPy values so that prediction from an
exported ONNX file needs no PyTorch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

BLANK_INDEX = 0

NAMED_CHARSETS: dict[str, str] = {
    "digits": "0123456789",
    "lower": "abcdefghijklmnopqrstuvwxyz",
    "upper": "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
}
NAMED_CHARSETS["alpha"] = NAMED_CHARSETS["lower"] + NAMED_CHARSETS["upper"]
NAMED_CHARSETS["alnum"] = NAMED_CHARSETS["digits"] + NAMED_CHARSETS["alpha"]
NAMED_CHARSETS["alnum_lower"] = NAMED_CHARSETS["digits"] + NAMED_CHARSETS["lower"]
NAMED_CHARSETS["alnum_upper"] = NAMED_CHARSETS["digits"] + NAMED_CHARSETS["upper"]
NAMED_CHARSETS["hex"] = "0123456789abcdef"


def resolve_charset(spec: str) -> str:
    """Expand a charset spec into its sorted, de-duplicated characters.

    A spec is a ``+``-joined list of parts; each part is a named set
    (``digits``, ``lower``, ``upper``, ``alpha``, ``alnum``, ``alnum_lower``,
    ``alnum_upper``, ``hex``) or literal characters. ``digits+XYZ`` is the ten
    digits and three letters. A literal ``+`` cannot be written in a spec.
    """
    if not spec:
        raise ValueError("charset spec is empty: give a named set such as 'digits' or literal characters")
    chars: set[str] = set()
    for part in spec.split("+"):
        if not part:
            continue
        chars.update(NAMED_CHARSETS.get(part, part))
    if any(c.isspace() for c in chars):
        raise ValueError(f"charset spec {spec!r} contains whitespace, which labels cannot hold")
    return "".join(sorted(chars))


def min_ctc_steps(label: str) -> int:
    """Return the fewest CTC output steps that can emit ``label``.

    CTC needs one step per character plus a blank between each pair of equal
    neighbours, so ``6666`` needs 7 steps and ``abcd`` needs 4.
    """
    repeats = sum(1 for a, b in zip(label, label[1:]) if a == b)
    return len(label) + repeats


@dataclass(frozen=True)
class Codec:
    """Maps characters to CTC class indices; index 0 is the blank."""

    alphabet: str

    def __post_init__(self) -> None:
        if len(set(self.alphabet)) != len(self.alphabet):
            raise ValueError(f"alphabet has repeated characters: {self.alphabet!r}")
        if not self.alphabet:
            raise ValueError("alphabet is empty")

    @classmethod
    def from_labels(cls, labels: Iterable[str]) -> Codec:
        chars: set[str] = set()
        for label in labels:
            chars.update(label)
        return cls("".join(sorted(chars)))

    @property
    def num_classes(self) -> int:
        """Number of output classes, the blank included."""
        return len(self.alphabet) + 1

    def unknown_chars(self, label: str) -> str:
        """Return the characters of ``label`` that the alphabet lacks, in order of first use."""
        known = set(self.alphabet)
        seen: list[str] = []
        for char in label:
            if char not in known and char not in seen:
                seen.append(char)
        return "".join(seen)

    def encode(self, label: str) -> list[int]:
        lookup = {c: i + 1 for i, c in enumerate(self.alphabet)}
        try:
            return [lookup[c] for c in label]
        except KeyError as error:
            raise ValueError(
                f"label {label!r} has character {error.args[0]!r} outside the alphabet {self.alphabet!r}"
            ) from None

    def decode_indices(self, indices: Sequence[int]) -> str:
        """Turn one best-path index sequence into text: collapse repeats, then drop blanks."""
        chars = []
        previous = -1
        for index in indices:
            index = int(index)
            if index != previous and index != BLANK_INDEX:
                chars.append(self.alphabet[index - 1])
            previous = index
        return "".join(chars)

    def decode_greedy(self, probs: np.ndarray) -> list[tuple[str, float]]:
        """Decode a batch of per-step class probabilities with the best path.

        ``probs`` has shape (T, N, C) and contains probabilities (softmax output).
        Confidence is the product of the best-path probabilities over the steps
        that emit a character, so a blank-heavy but certain read scores near 1;
        an empty read gets the mean blank probability.
        """
        best = probs.argmax(axis=2)  # (T, N)
        best_prob = probs.max(axis=2)  # (T, N)
        results = []
        for n in range(best.shape[1]):
            path = best[:, n]
            text = self.decode_indices(path)
            emitting = np.ones(len(path), dtype=bool)
            emitting[1:] = path[1:] != path[:-1]
            emitting &= path != BLANK_INDEX
            if emitting.any():
                confidence = float(np.prod(best_prob[emitting, n]))
            else:
                confidence = float(best_prob[:, n].mean())
            results.append((text, confidence))
        return results
