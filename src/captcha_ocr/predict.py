"""Recognizer: reads CAPTCHA images with a trained checkpoint or an exported ONNX file.

``Recognizer.load("model.pth").predict("image.png")`` returns the text and its
confidence. An ``.onnx`` file needs only onnxruntime, NumPy and Pillow; PyTorch
is imported only for ``.pth`` files.

By default each image is read three times: as it is, and shifted a few pixels
left and right (see :func:`shifted_views`). Where the three readings differ,
the text that all three views together find most probable wins. A model of
several members (``train --members``) reads every view with each member, and
all those readings are combined in the same way.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from captcha_ocr.charset import Codec, text_log_likelihood
from captcha_ocr.config import MAX_MEMBERS
from captcha_ocr.data.images import Preprocessing, load_image, to_model_input

ImageInput = str | os.PathLike | bytes | Image.Image

# Views of each image read by default: as it is, and shifted left and right.
DEFAULT_VIEWS = 3
# Pixels (of the model's input width) between one view and the next.
VIEW_SHIFT = 3
# More views would shift the image by more than 21 pixels, a ninth of the default
# width, and each one adds a full forward pass.
MAX_VIEWS = 15


@dataclass(frozen=True)
class Prediction:
    text: str
    confidence: float


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def _check_views(views: Any) -> int:
    """Return ``views`` as an int, or raise ValueError unless it is a whole number from 1 to MAX_VIEWS."""
    if isinstance(views, bool) or not isinstance(views, numbers.Integral) or not 1 <= views <= MAX_VIEWS:
        raise ValueError(f"views must be a whole number from 1 to {MAX_VIEWS}, got {views!r}")
    return int(views)


def shifted_views(pixels: np.ndarray, views: int, shift: int = VIEW_SHIFT) -> np.ndarray:
    """Stack ``views`` copies of uint8 pixels (N, H, W), shifted sideways: (views * N, H, W).

    View 0 is the images as they are. The others are shifted right by
    ``shift``, left by ``shift``, right by ``2 * shift`` and so on. White fills
    the uncovered columns, as in the training augmentation. Image i of view v
    is row ``v * N + i``.
    """
    views = _check_views(views)
    stacked = [pixels]
    width = pixels.shape[-1]
    for v in range(1, views):
        offset = shift * ((v + 1) // 2) * (1 if v % 2 else -1)
        moved = np.full_like(pixels, 255)
        if abs(offset) < width:
            if offset > 0:
                moved[..., offset:] = pixels[..., :-offset]
            else:
                moved[..., :offset] = pixels[..., -offset:]
        stacked.append(moved)
    return np.concatenate(stacked)


def combine_views(log_probs: np.ndarray, readings: list[tuple[str, float]], codec: Codec, views: int) -> list[Prediction]:
    """Pick one reading per image from the readings of its views.

    ``log_probs`` (T, views * N, C) and ``readings`` (text and path confidence
    per row) are ordered as :func:`shifted_views` stacks them. Where the views
    read different texts, the text with the highest total CTC log-likelihood
    over the views wins. The confidence is the mean over the views of the path
    confidence of the chosen text, counting 0 for a view that read another text,
    so a reading the views disagree on scores low.
    """
    count = len(readings) // views
    predictions = []
    for i in range(count):
        rows = [v * count + i for v in range(views)]
        texts = [readings[row][0] for row in rows]
        chosen = texts[0]
        if len(set(texts)) > 1:
            candidates = list(dict.fromkeys(texts))
            scores = [text_log_likelihood(log_probs[:, rows], codec.encode(text)).sum() for text in candidates]
            chosen = candidates[int(np.argmax(scores))]
        confidence = sum(readings[row][1] for row in rows if readings[row][0] == chosen) / views
        predictions.append(Prediction(chosen, confidence))
    return predictions


def read_logits(logits: np.ndarray, codec: Codec, lengths: list[int] | None, copies: int) -> list[Prediction]:
    """Decode logits (T, copies * N, C) into one prediction per image, combining its copies as views."""
    log_probs = log_softmax(logits.astype(np.float64), axis=2)
    readings = codec.decode_log_probs(log_probs, lengths)
    return combine_views(log_probs, readings, codec, copies)


class _TorchBackend:
    def __init__(self, payload: dict[str, Any], device: str | None) -> None:
        import torch

        from captcha_ocr.model import ModelConfig, build_model

        self.torch = torch
        try:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError:
            raise ValueError(f"invalid device {device!r}: use cpu, cuda or cuda:N") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine; use cpu")
        self.model = build_model(ModelConfig.from_dict(payload["model_config"]))
        self.model.load_state_dict(payload["model_state"])
        self.model.to(self.device).eval()

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            batch = self.torch.from_numpy(inputs).to(self.device)
            return self.model(batch).float().cpu().numpy()


class _OnnxBackend:
    def __init__(self, path: Path) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"{path}: not a valid ONNX model ({first_line})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: inputs})[0]


def _label_lengths(value: Any, path: Any) -> list[int] | None:
    """Check the label lengths a model file records. An empty list or None means any length."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value):
        raise ValueError(
            f"{path}: invalid label_lengths {value!r} in the model file (expected a list of positive "
            "integers); export or train the model again with this captcha-ocr version"
        )
    return sorted(set(value)) or None


def _members(model_config: Any, path: Any) -> int:
    """Return the member count that a model file records. Files without one contain a single network."""
    value = model_config.get("members", 1) if isinstance(model_config, dict) else 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_MEMBERS:
        raise ValueError(
            f"{path}: invalid members {value!r} in the model file (expected a whole number from 1 to {MAX_MEMBERS}); "
            "export or train the model again"
        )
    return value


class Recognizer:
    """A trained model ready to read images."""

    def __init__(
        self, backend: Any, codec: Codec, preprocessing: Preprocessing, metadata: dict[str, Any], views: int = DEFAULT_VIEWS
    ):
        self.backend = backend
        # Shifted copies of each image read together (see shifted_views); 1 reads the image alone.
        self.views = _check_views(views)
        self.codec = codec
        self.preprocessing = preprocessing
        self.metadata = metadata
        # Readings keep to these label lengths, those of the training set. None reads any length.
        self.label_lengths: list[int] | None = _label_lengths(metadata.get("label_lengths"), metadata.get("path"))
        # Networks in the model (see captcha_ocr.model.MemberSet). Each one reads every view.
        self.members: int = _members(metadata.get("model_config"), metadata.get("path"))

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str | None = None, any_length: bool = False, views: int = DEFAULT_VIEWS
    ) -> Recognizer:
        """Load a ``.pth`` model or checkpoint file, or an exported ``.onnx`` file.

        A model trained with ``keep_lengths`` (the default) reads only the
        label lengths of its training set. ``any_length`` lifts that rule.
        ``views`` is the number of shifted copies of each image read together
        (see :func:`shifted_views`); 1 reads each image once, 1.4 to 3 times as fast
        (measured on a 2-core CPU, one image at a time and in batches).
        """
        views = _check_views(views)
        recognizer = cls._load(Path(path), device)
        recognizer.views = views
        if any_length:
            recognizer.label_lengths = None
        return recognizer

    @classmethod
    def _load(cls, path: Path, device: str | None) -> Recognizer:
        if path.is_dir():
            raise ValueError(f"{path}: a folder, not a model file; give a .pth or .onnx file")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model file not found")
        if path.suffix.lower() == ".onnx":
            return cls._load_onnx(path)
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ValueError(
                f"{path}: reading a .pth model needs PyTorch, which is not installed; "
                "install it (pip install torch) or export the model with 'captcha-ocr export' "
                "and predict from the .onnx file"
            ) from None
        from captcha_ocr.checkpoint import CheckpointError, load_checkpoint

        payload = load_checkpoint(path)
        try:
            backend = _TorchBackend(payload, device)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        except (KeyError, TypeError, RuntimeError) as error:
            first_line = str(error).strip().splitlines()[0]
            raise CheckpointError(
                f"{path}: the weights do not fit the model this captcha-ocr version builds ({first_line}); "
                "use the captcha-ocr release that trained it, or train again"
            ) from None
        metadata = {
            "format": "pytorch",
            "path": str(path),
            "alphabet": payload["alphabet"],
            "session_id": payload.get("session_id"),
            "epoch": payload.get("epoch"),
            "metrics": payload.get("metrics", {}),
            "model_config": payload["model_config"],
            "preprocessing": payload["preprocessing"],
            "ignore_case": payload.get("ignore_case", False),
            "label_lengths": payload.get("label_lengths"),
        }
        return cls(backend, Codec(payload["alphabet"]), Preprocessing.from_dict(payload["preprocessing"]), metadata)

    @classmethod
    def _load_onnx(cls, path: Path) -> Recognizer:
        backend = _OnnxBackend(path)
        raw = backend.metadata
        missing = [key for key in ("alphabet", "preprocessing") if key not in raw]
        if missing:
            raise ValueError(
                f"{path}: ONNX file lacks the metadata {missing}; export it with 'captcha-ocr export'"
            )
        metadata: dict[str, Any] = {"format": "onnx", "path": str(path)}
        for key, value in raw.items():
            try:
                metadata[key] = json.loads(value)
            except json.JSONDecodeError:
                metadata[key] = value
        alphabet = metadata["alphabet"]
        return cls(backend, Codec(alphabet), Preprocessing.from_dict(metadata["preprocessing"]), metadata)

    def pixels(self, image: ImageInput) -> np.ndarray:
        """Decode one image into the uint8 (H, W) pixels the model reads."""
        return load_image(image, self.preprocessing)

    def predict_pixels(self, pixels: np.ndarray) -> list[Prediction]:
        """Read a batch of already decoded uint8 pixels of shape (N, H, W)."""
        inputs = to_model_input(shifted_views(pixels, self.views), self.preprocessing)
        # Logits (T, members * views * N, C): the members of a MemberSet come one after another, each over all the views.
        logits = self.backend.logits(inputs)
        if logits.ndim != 3 or logits.shape[1] != self.members * len(inputs):
            raise ValueError(
                f"{self.metadata.get('path')}: the model gave logits of shape {tuple(logits.shape)} for {len(inputs)} "
                f"inputs, where its metadata records {self.members} member(s) (expected {self.members * len(inputs)} "
                "rows on axis 1); export the model again"
            )
        return read_logits(logits, self.codec, self.label_lengths, self.members * self.views)

    def predict(self, image: ImageInput) -> Prediction:
        """Read one image given as a path, bytes or a PIL image."""
        return self.predict_pixels(self.pixels(image)[None])[0]

    def predict_batch(self, images: Sequence[ImageInput] | Iterable[ImageInput], batch_size: int = 64) -> list[Prediction]:
        """Read many images, ``batch_size`` at a time."""
        images = list(images)
        results: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            chunk = np.stack([self.pixels(image) for image in images[start : start + batch_size]])
            results.extend(self.predict_pixels(chunk))
        return results
