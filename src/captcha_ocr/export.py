"""ONNX export of a trained CRNN, and the check that the ONNX file reads as PyTorch does.

``export_onnx("model.pth", "model.onnx")`` writes a graph with one input,
``images`` (N, 1, H, W) float32, and one output, ``logits`` (T, N, C), with a
dynamic batch axis. Everything :class:`~captcha_ocr.predict.Recognizer` needs
besides the weights (alphabet, preprocessing, model settings) is stored as JSON
strings in the file's ``metadata_props``, so an ``.onnx`` file predicts on its own
with onnxruntime, NumPy and Pillow.

The file is written beside the target under a temporary name, run through ONNX
Runtime and PyTorch on the same inputs, and renamed into place only when the
decoded texts are equal and the logits agree within a tolerance.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captcha_ocr import __version__
from captcha_ocr.charset import Codec
from captcha_ocr.checkpoint import load_checkpoint
from captcha_ocr.data.images import (
    ImageError,
    Preprocessing,
    is_image_file,
    load_image,
    to_model_input,
)
from captcha_ocr.model import CRNN, MemberSet, ModelConfig, build_model
from captcha_ocr.predict import Recognizer, read_logits

logger = logging.getLogger(__name__)

ONNX_FORMAT = "captcha-ocr-onnx"
ONNX_FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-3
DEFAULT_VERIFY_LIMIT = 200
EXPORTERS = ("auto", "torchscript", "dynamo")

# Inputs of every export check besides real images: seeded uniform noise, plus a
# blank white and a black image, which drive the recurrent layers far from the training data.
RANDOM_IMAGES = 8
SYNTHETIC_CAPTCHAS = 16
VERIFY_BATCH = 32


class ExportError(ValueError):
    """The model cannot be exported; the message names the file and the reason."""


class VerificationError(RuntimeError):
    """The exported graph reads the check images differently from the PyTorch model."""


@dataclass
class VerifyReport:
    """Inputs, differences and outcome of one export check."""

    images: int
    random_inputs: int
    sources: list[str]
    max_abs_diff: float
    tolerance: float
    texts_equal: bool
    mismatches: list[str] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.texts_equal and self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        return (
            f"Checked {self.images} images and {self.random_inputs} random inputs "
            f"({', '.join(self.sources)}) in batches of {sorted(set(self.batch_sizes))}: "
            f"max abs logit difference {self.max_abs_diff:.3g} (tolerance {self.tolerance:g}), "
            f"texts equal: {'yes' if self.texts_equal else 'no'}"
        )


@dataclass
class ExportResult:
    path: Path
    opset: int
    exporter: str
    metadata: dict[str, str]
    report: VerifyReport


@dataclass
class CheckImages:
    """Named uint8 images (N, H, W) for the export check, and where they came from."""

    names: list[str]
    pixels: np.ndarray
    sources: list[str]
    random_inputs: int


def load_model(path: str | os.PathLike) -> tuple[CRNN | MemberSet, dict[str, Any]]:
    """Rebuild the model (a CRNN or a MemberSet) in eval mode on the CPU from a model file or training checkpoint."""
    payload = load_checkpoint(path)
    for key in ("model_config", "model_state", "alphabet", "preprocessing"):
        if key not in payload:
            raise ExportError(f"{path}: the checkpoint lacks {key!r}; export a file written by 'captcha-ocr train'")
    model = build_model(ModelConfig.from_dict(payload["model_config"]))
    model.load_state_dict(payload["model_state"])
    return model.eval(), payload


def onnx_metadata(payload: dict[str, Any], source: Path, opset: int, exporter: str) -> dict[str, str]:
    """Build the metadata_props of the exported file, each value a JSON string."""
    values = {
        "format": ONNX_FORMAT,
        "format_version": ONNX_FORMAT_VERSION,
        "alphabet": payload["alphabet"],
        "preprocessing": Preprocessing.from_dict(payload["preprocessing"]).to_dict(),
        "model_config": payload["model_config"],
        "ignore_case": bool(payload.get("ignore_case", False)),
        "label_lengths": payload.get("label_lengths"),
        "session_id": payload.get("session_id"),
        "epoch": payload.get("epoch"),
        "metrics": payload.get("metrics", {}),
        "exported_from": source.name,
        "captcha_ocr_version": __version__,
        "torch_version": torch.__version__,
        "opset": opset,
        "exporter": exporter,
    }
    return {key: json.dumps(value, ensure_ascii=False, default=str) for key, value in values.items()}


def _export_torchscript(model: CRNN | MemberSet, example: torch.Tensor, path: Path, opset: int) -> None:
    # (N, 1, H, W) -> (T, members * N, C): the batch is axis 0 in and, times the members, axis 1 out.
    rows = "batch" if model.config.members == 1 else f"{model.config.members}_members_x_batch"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {1: rows}},
        )
    # The tracer warns about its own deprecation and about Python booleans in the
    # recurrent layers' argument checks. The comparison after export decides instead.
    for warning in caught:
        logger.debug("torch.onnx (TorchScript exporter): %s", warning.message)


def _export_dynamo(model: CRNN | MemberSet, example: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model, (example,), dynamo=True, opset_version=opset, external_data=False,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes={"images": {0: batch}},
    )
    program.save(str(path), external_data=False)


def _write_graph(model: CRNN | MemberSet, path: Path, opset: int, exporter: str) -> str:
    """Export ``model`` to ``path``; returns the exporter that produced the file.

    ``auto`` uses the TorchScript exporter (``dynamo=False``) and falls back to the
    dynamo exporter when it fails. On this CRNN both exporters map the
    recurrent layers (nn.GRU or nn.LSTM) onto ONNX GRU or LSTM nodes and match
    PyTorch to about 1e-7 (measured with torch 2.13). The TorchScript exporter
    takes well under a second and needs onnx but no onnxscript. The dynamo exporter took
    15 to 35 s on two CPU cores. TorchScript export is deprecated upstream, so
    ``auto`` falls back to dynamo, and ``--exporter dynamo`` selects it directly.
    """
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"ONNX export needs the {' and '.join(missing)} package(s): "
            "in the captcha-ocr checkout, pip install -e '.[export]'"
        )
    config = model.config
    # Batch 2, not 1: a batch of 1 lets the tracer fold the batch size into reshapes.
    example = torch.zeros(2, 1, config.height, config.width)
    if exporter in ("auto", "torchscript"):
        try:
            _export_torchscript(model, example, path, opset)
            return "torchscript"
        except Exception as error:  # noqa: BLE001 - any exporter failure falls through to dynamo
            if exporter == "torchscript":
                raise ExportError(f"the TorchScript exporter failed: {type(error).__name__}: {error}") from error
            logger.warning("TorchScript ONNX export failed (%s: %s); trying the dynamo exporter", type(error).__name__, error)
    try:
        import onnxscript  # noqa: F401 - the dynamo exporter needs it
    except ImportError:
        raise ExportError("the dynamo exporter needs onnxscript: in the captcha-ocr checkout, pip install -e '.[export]'") from None
    _export_dynamo(model, example, path, opset)
    return "dynamo"


def _store_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, metadata)
    graph.doc_string = (
        "captcha-ocr CRNN: images (N, 1, H, W) float32 -> logits (T, members * N, C), blank = class 0; "
        "members (in the model_config metadata) are networks read one after another"
    )
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def _folder_images(folder: Path, limit: int) -> Iterator[Path]:
    if folder.is_file():
        yield folder
        return
    if not folder.is_dir():
        raise ExportError(f"{folder}: --verify-data must be an image folder")
    count = 0
    for path in sorted(folder.rglob("*")):
        if count >= limit:
            return
        if path.is_file() and is_image_file(path) and not path.name.startswith("."):
            count += 1
            yield path


def _run_folder(model_path: Path, payload: dict[str, Any]) -> Path | None:
    """Find the run folder of a model file (outputs/models/) or checkpoint (outputs/runs/<ID>/checkpoints/)."""
    session_id = payload.get("session_id")
    candidates = [model_path.parent.parent]
    if session_id:
        candidates.append(model_path.parent.parent / "runs" / str(session_id))
    for folder in candidates:
        if (folder / "data.json").is_file() and (folder / "config.json").is_file():
            return folder
    return None


def _run_images(model_path: Path, payload: dict[str, Any], limit: int) -> tuple[list[Path], str | None]:
    """List the images of the checkpoint's run that still exist, validation sources first."""
    from captcha_ocr.data.sources import SourceError, collect

    folder = _run_folder(model_path, payload)
    if folder is None:
        return [], None
    try:
        data = json.loads((folder / "data.json").read_text(encoding="utf-8"))
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))["config"]
        sources = [s for s in data.get("val_sources", []) + data.get("sources", []) if Path(s).exists()]
        collected = collect(
            sources, label_pattern=config["label_pattern"], ignore_case=config.get("ignore_case", False),
            path_column=config.get("path_column"), label_column=config.get("label_column"),
        )
    except (OSError, ValueError, KeyError, SourceError) as error:
        logger.debug("Run folder %s gives no check images: %s", folder, error)
        return [], None
    paths = [sample.path for sample in collected.samples[:limit]]
    return paths, f"{len(paths)} images of run {folder.name}" if paths else None


def _synthetic_captchas(alphabet: str, preprocessing: Preprocessing, count: int) -> np.ndarray:
    from captcha.image import ImageCaptcha

    rng = random.Random(0)
    drawer = ImageCaptcha(width=max(preprocessing.width, 60), height=max(preprocessing.height, 30))
    images = [drawer.generate_image("".join(rng.choice(alphabet) for _ in range(4))) for _ in range(count)]
    return np.stack([load_image(image, preprocessing) for image in images])


def _random_images(preprocessing: Preprocessing) -> np.ndarray:
    rng = np.random.default_rng(0)
    shape = (RANDOM_IMAGES, preprocessing.height, preprocessing.width)
    noise = rng.integers(0, 256, size=shape, dtype=np.uint8)
    white = np.full((1, *shape[1:]), 255, dtype=np.uint8)
    black = np.zeros((1, *shape[1:]), dtype=np.uint8)
    return np.concatenate([noise, white, black])


def _decode_files(paths: list[Path], preprocessing: Preprocessing) -> tuple[list[str], list[np.ndarray]]:
    names, pixels = [], []
    for path in paths:
        try:
            pixels.append(load_image(path, preprocessing))
            names.append(str(path))
        except (ImageError, OSError) as error:
            logger.warning("Export check skips %s: %s", path, error)
    return names, pixels


def check_images(
    model_path: Path, payload: dict[str, Any], verify_data: Path | None, limit: int = DEFAULT_VERIFY_LIMIT
) -> CheckImages:
    """Collect the export check's inputs.

    Random images always; then the images of ``verify_data`` when given, else
    those of the checkpoint's run folder, else synthetic CAPTCHAs drawn with the
    checkpoint's alphabet.
    """
    preprocessing = Preprocessing.from_dict(payload["preprocessing"])
    random_pixels = _random_images(preprocessing)
    names = [f"random[{i}]" for i in range(len(random_pixels))]
    blocks, sources = [random_pixels], []
    if verify_data is not None:
        found, decoded = _decode_files(list(_folder_images(verify_data, limit)), preprocessing)
        if not decoded:
            raise ExportError(f"{verify_data}: no readable images to check the export with")
        sources.append(f"{len(decoded)} images from {verify_data}")
    else:
        paths, description = _run_images(model_path, payload, limit)
        found, decoded = _decode_files(paths, preprocessing)
        if decoded:
            sources.append(description or f"{len(decoded)} run images")
        else:
            captchas = _synthetic_captchas(payload["alphabet"], preprocessing, SYNTHETIC_CAPTCHAS)
            found, decoded = [f"synthetic[{i}]" for i in range(len(captchas))], list(captchas)
            sources.append(f"{len(captchas)} synthetic CAPTCHAs")
    names += found
    blocks.append(np.stack(decoded))
    sources.append(f"{len(random_pixels)} random")
    return CheckImages(names, np.concatenate(blocks), sources, len(random_pixels))


def _batches(count: int) -> Iterator[slice]:
    """Yield one image alone first, then batches of VERIFY_BATCH, so the batch axis varies."""
    yield slice(0, 1)
    for start in range(1, count, VERIFY_BATCH):
        yield slice(start, min(start + VERIFY_BATCH, count))


def _readings(logits: np.ndarray, codec: Codec, recognizer: Recognizer, members: int) -> list[str]:
    """Decode logits (T, members * N, C) into one text per image, combining the members."""
    return [prediction.text for prediction in read_logits(logits, codec, recognizer.label_lengths, members)]


def compare(model: CRNN | MemberSet, recognizer: Recognizer, images: CheckImages, tolerance: float = DEFAULT_TOLERANCE) -> VerifyReport:
    """Run ``images`` through the PyTorch model and an ONNX recognizer and compare logits and texts."""
    preprocessing = recognizer.preprocessing
    codec: Codec = recognizer.codec
    max_diff, mismatches, batch_sizes = 0.0, [], []
    for part in _batches(len(images.pixels)):
        inputs = to_model_input(images.pixels[part], preprocessing)
        with torch.inference_mode():
            expected = model(torch.from_numpy(inputs)).numpy()  # (T, N, C)
        actual = recognizer.backend.logits(inputs)
        if actual.shape != expected.shape:
            raise VerificationError(f"ONNX logits have shape {actual.shape}, PyTorch gives {expected.shape}")
        max_diff = max(max_diff, float(np.abs(actual - expected).max()))
        batch_sizes.append(len(inputs))
        # The texts compared are those predict returns. A MemberSet's members are combined
        # first, because one member's reading may flip between two near-equal texts.
        torch_texts = _readings(expected, codec, recognizer, model.config.members)
        onnx_texts = _readings(actual, codec, recognizer, model.config.members)
        for name, want, got in zip(images.names[part], torch_texts, onnx_texts, strict=True):
            if want != got:
                mismatches.append(f"{name}: PyTorch {want!r}, ONNX {got!r}")
    return VerifyReport(
        images=len(images.pixels) - images.random_inputs, random_inputs=images.random_inputs,
        sources=images.sources, max_abs_diff=max_diff, tolerance=tolerance,
        texts_equal=not mismatches, mismatches=mismatches, batch_sizes=batch_sizes,
    )


def _check_metadata(recognizer: Recognizer, payload: dict[str, Any]) -> None:
    metadata = recognizer.metadata
    expected = Preprocessing.from_dict(payload["preprocessing"]).to_dict()
    if metadata.get("alphabet") != payload["alphabet"] or metadata.get("preprocessing") != expected:
        raise VerificationError("the ONNX metadata does not round-trip the checkpoint's alphabet and preprocessing")


def export_onnx(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    verify_data: str | os.PathLike | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    verify_limit: int = DEFAULT_VERIFY_LIMIT,
) -> ExportResult:
    """Export a ``.pth`` model or checkpoint to ONNX and check it against PyTorch.

    Raises :class:`VerificationError` when any decoded text differs or the
    logits differ by more than ``tolerance``; ``out`` is then left untouched.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    model_path, out = Path(model_path), Path(out)
    model, payload = load_model(model_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.stem}.partial-{os.getpid()}.onnx")
    try:
        used = _write_graph(model, partial, opset, exporter)
        metadata = onnx_metadata(payload, model_path, opset, used)
        _store_metadata(partial, metadata)
        images = check_images(model_path, payload, Path(verify_data) if verify_data else None, verify_limit)
        recognizer = Recognizer.load(partial)
        _check_metadata(recognizer, payload)
        report = compare(model, recognizer, images, tolerance)
        logger.info("%s", report.summary())
        if not report.passed:
            examples = "; ".join(report.mismatches[:5]) or "no text differs"
            raise VerificationError(
                f"the ONNX export disagrees with PyTorch, so {out} was not written: "
                f"max abs logit difference {report.max_abs_diff:.3g} (tolerance {tolerance:g}), "
                f"{len(report.mismatches)} texts differ ({examples})"
            )
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("Wrote %s (opset %d, %s exporter)", out, opset, used)
    return ExportResult(out, opset, used, metadata, report)
