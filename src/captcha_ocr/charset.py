"""The CTC codec: alphabet, blank index, label encoding and decoding.

The codec works on plain Python and NumPy values so that prediction from an
exported ONNX file needs no PyTorch.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

BLANK_INDEX = 0
# Log-probability of an impossible decoding state.
_IMPOSSIBLE = -1e30
# Images searched at once for a reading of an allowed length.
LENGTH_SEARCH_CHUNK = 64

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


def emitting_steps(paths: np.ndarray) -> np.ndarray:
    """Mark the steps of best paths (T, N) that emit a character: not blank, and not a repeat of the step before."""
    emitting = paths != BLANK_INDEX
    emitting[1:] &= paths[1:] != paths[:-1]
    return emitting


def best_paths_of_length(log_probs: np.ndarray, lengths: Collection[int]) -> tuple[np.ndarray, np.ndarray]:
    """Find each image's most probable CTC path among those that read ``lengths`` characters.

    ``log_probs`` has shape (T, N, C), class 0 the blank. Returns the paths
    (T, N) and a (N,) mask of the images for which such a path exists. An
    image without one keeps its unconstrained best path.

    The best path overall (greedy decoding) can merge two equal neighbours
    into one character when the model puts no blank between them, reading
    ``g888x`` as ``g88x``. Where every label has five characters, the best
    five-character path usually keeps the blank the greedy path dropped.
    This is a Viterbi search over states (characters read so far, last class).
    """
    steps, count, classes = log_probs.shape
    # A path of T steps reads at most T characters, so longer lengths are dropped.
    allowed = sorted({int(n) for n in lengths if 0 <= int(n) <= steps})
    greedy = log_probs.argmax(axis=2)
    if not allowed or steps == 0 or count == 0:
        return greedy, np.zeros(count, dtype=bool)
    longest = allowed[-1]
    states = longest + 1
    chars = classes - 1
    read = np.arange(states)
    # score[n, k, s]: best log-probability of a path that has read k characters and whose last class is s.
    score = np.full((count, states, classes), _IMPOSSIBLE)
    score[:, 0, BLANK_INDEX] = log_probs[0, :, BLANK_INDEX]
    if longest >= 1:
        score[:, 1, 1:] = log_probs[0, :, 1:]
    back_read = np.zeros((steps, count, states, classes), dtype=np.int32)
    back_class = np.zeros((steps, count, states, classes), dtype=np.int32)
    char_index = np.arange(1, classes)
    for t in range(1, steps):
        new = np.empty_like(score)
        # A blank keeps the count and may follow any class.
        last = score.argmax(axis=2)  # (N, K)
        new[:, :, BLANK_INDEX] = np.take_along_axis(score, last[:, :, None], axis=2)[:, :, 0] + log_probs[t, :, None, BLANK_INDEX]
        back_read[t, :, :, BLANK_INDEX] = read
        back_class[t, :, :, BLANK_INDEX] = last
        # A character c either repeats the previous step's c (same count) or starts
        # a new character after a blank or after a different character (count - 1).
        before = np.full_like(score, _IMPOSSIBLE)
        before[:, 1:] = score[:, :-1]
        before_chars = before[:, :, 1:]  # (N, K, C-1)
        if chars >= 2:
            # With kth=1, argpartition puts the best character first and the second best next.
            pair = np.argpartition(-before_chars, 1, axis=2)[:, :, :2]
            first, second = pair[:, :, 0:1], pair[:, :, 1:2]
            first_score = np.take_along_axis(before_chars, first, axis=2)
            second_score = np.take_along_axis(before_chars, second, axis=2)
            is_first = np.arange(chars)[None, None, :] == first
            other_score = np.where(is_first, second_score, first_score)
            other_class = np.where(is_first, second, first) + 1
        else:
            other_score = np.full_like(before_chars, _IMPOSSIBLE)
            other_class = np.zeros(before_chars.shape, dtype=np.int64)
        options = np.stack(
            [score[:, :, 1:], np.broadcast_to(before[:, :, BLANK_INDEX : BLANK_INDEX + 1], before_chars.shape), other_score]
        )
        choice = options.argmax(axis=0)
        new[:, :, 1:] = options.max(axis=0) + log_probs[t, :, None, 1:]
        back_read[t, :, :, 1:] = np.where(choice == 0, read[None, :, None], read[None, :, None] - 1)
        back_class[t, :, :, 1:] = np.where(choice == 0, char_index, np.where(choice == 1, BLANK_INDEX, other_class))
        score = new
    final = score[:, allowed, :].reshape(count, -1)  # (N, len(allowed) * C)
    best = final.argmax(axis=1)
    found = final[np.arange(count), best] > _IMPOSSIBLE / 2
    k = np.asarray(allowed)[best // classes]
    s = best % classes
    paths = np.empty((steps, count), dtype=np.int64)
    rows = np.arange(count)
    for t in range(steps - 1, -1, -1):
        paths[t] = s
        if t:
            k, s = back_read[t, rows, k, s], back_class[t, rows, k, s]
    paths[:, ~found] = greedy[:, ~found]
    return paths, found


def text_log_likelihood(log_probs: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """Return log P(text) for each image of ``log_probs`` (T, N, C): the sum over every CTC path that reads it.

    ``indices`` are the text's class indices (as from :meth:`Codec.encode`).
    This is the CTC forward algorithm, the quantity the training loss
    minimises; a text that needs more steps than there are gets about -1e30.
    """
    steps, count, _ = log_probs.shape
    # The text with a blank before, between and after its characters.
    extended = np.full(2 * len(indices) + 1, BLANK_INDEX, dtype=np.int64)
    extended[1::2] = indices
    # A path may jump over a blank only to a character that differs from the one before the blank.
    can_skip = np.zeros(len(extended), dtype=bool)
    can_skip[2:] = (extended[2:] != BLANK_INDEX) & (extended[2:] != extended[:-2])
    if steps == 0:
        return np.full(count, _IMPOSSIBLE if len(indices) else 0.0)
    alpha = np.full((count, len(extended)), _IMPOSSIBLE)
    alpha[:, :2] = log_probs[0][:, extended[:2]]
    for t in range(1, steps):
        from_one_back = np.full_like(alpha, _IMPOSSIBLE)
        from_one_back[:, 1:] = alpha[:, :-1]
        from_two_back = np.full_like(alpha, _IMPOSSIBLE)
        from_two_back[:, 2:] = np.where(can_skip[2:], alpha[:, :-2], _IMPOSSIBLE)
        alpha = np.logaddexp(np.logaddexp(alpha, from_one_back), from_two_back) + log_probs[t][:, extended]
    # A path ends on the last character or on the blank after it.
    return np.logaddexp(alpha[:, -1], alpha[:, -2]) if len(extended) > 1 else alpha[:, -1]


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

    def decode_paths(self, log_probs: np.ndarray, lengths: Collection[int] | None = None) -> np.ndarray:
        """Return the best path (T, N) of each image, kept to ``lengths`` characters where given.

        Images whose best path already reads an allowed number of characters
        keep it. The others get their best path among those that do.
        """
        paths = log_probs.argmax(axis=2)
        if lengths is None or len(lengths) == 0:
            return paths
        allowed = [int(n) for n in lengths]
        read_lengths = emitting_steps(paths).sum(axis=0)  # (N,)
        wrong = np.flatnonzero(~np.isin(read_lengths, allowed)).tolist()
        # In chunks, because the search keeps back-pointers of size T x N x (longest + 1) x C.
        for start in range(0, len(wrong), LENGTH_SEARCH_CHUNK):
            chunk = wrong[start : start + LENGTH_SEARCH_CHUNK]
            paths[:, chunk], _ = best_paths_of_length(log_probs[:, chunk], allowed)
        return paths

    def decode(self, probs: np.ndarray, lengths: Collection[int] | None = None) -> list[tuple[str, float]]:
        """Decode a batch of per-step class probabilities into (text, confidence) pairs.

        ``probs`` has shape (T, N, C) and contains probabilities (softmax output).
        With ``lengths``, a reading keeps to those label lengths (see
        :func:`best_paths_of_length`). Confidence is the product of the path's
        probabilities over the steps that emit a character, so a blank-heavy
        but certain read scores near 1. Steps where a kept length made the path
        leave the best class count too, so such a reading scores as low as the
        step it had to change. An empty read gets the mean probability of its path.
        """
        with np.errstate(divide="ignore"):
            return self.decode_log_probs(np.log(probs), lengths)

    def decode_log_probs(self, log_probs: np.ndarray, lengths: Collection[int] | None = None) -> list[tuple[str, float]]:
        """Decode per-step log-probabilities (T, N, C), as from log-softmax; see :meth:`decode`.

        Log-softmax of the logits keeps every class finite, where the log of a
        float32 softmax turns a class far behind into -inf and can leave no
        reading of an allowed length.
        """
        paths = self.decode_paths(log_probs, lengths)
        changed = paths != log_probs.argmax(axis=2)  # (T, N): steps off the best class
        path_prob = np.exp(np.take_along_axis(log_probs, paths[:, :, None], axis=2)[:, :, 0])  # (T, N)
        counted = emitting_steps(paths) | changed  # (T, N)
        results = []
        for n in range(paths.shape[1]):
            path = paths[:, n]
            text = self.decode_indices(path)
            if counted[:, n].any():
                confidence = float(np.prod(path_prob[counted[:, n], n]))
            elif len(path):
                confidence = float(path_prob[:, n].mean())
            else:
                confidence = 0.0
            results.append((text, confidence))
        return results
