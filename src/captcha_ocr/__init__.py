"""captcha-ocr: train, evaluate, export and serve CAPTCHA recognizers.

The public API is loaded lazily, so that reading images with an exported ONNX
model does not import PyTorch::

    from captcha_ocr import Recognizer
    Recognizer.load("outputs/models/captcha_model_latest.pth").predict("image.png")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Recognizer", "Prediction", "TrainConfig", "train", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Recognizer", "Prediction"):
        from captcha_ocr import predict

        return getattr(predict, name)
    if name == "TrainConfig":
        from captcha_ocr.config import TrainConfig

        return TrainConfig
    if name == "train":
        from captcha_ocr.session import train

        return train
    raise AttributeError(f"module 'captcha_ocr' has no attribute {name!r}")
