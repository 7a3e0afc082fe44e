"""The CRNN that most CAPTCHA tutorials and hobby repositories copy, as a baseline.

The input is RGB at 75x300, normalised with the ImageNet mean and deviation.
Two 3x3 convolutions with max-pooling follow, and every column of the 64x18
feature map becomes one of 75 time steps. A 64-unit projection with dropout
feeds a two-layer bidirectional GRU of 32 units and a linear CTC head. It
trains with batch 8 and Adam at 3e-4.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

HEIGHT = 75
WIDTH = 300
BATCH_SIZE = 8
LEARNING_RATE = 3e-4
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class TutorialCRNN(nn.Module):
    """RGB images (N, 3, 75, 300) in, per-step logits (75, N, classes) out."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 128, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(128, 64, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        # Two poolings take the height 75 -> 37 -> 18, so each column has 64 * 18 values.
        self.project = nn.Linear(64 * (HEIGHT // 2 // 2), 64)
        self.dropout = nn.Dropout(0.2)
        self.rnn = nn.GRU(64, 32, num_layers=2, bidirectional=True, dropout=0.25, batch_first=True)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(images)))
        x = self.pool(F.relu(self.conv2(x)))  # (N, 64, 18, 75)
        n, c, h, w = x.shape
        # (N, C, h, W) -> (N, W, C*h): one step per feature-map column.
        x = x.permute(0, 3, 1, 2).reshape(n, w, c * h)
        x = self.dropout(F.relu(self.project(x)))
        x, _ = self.rnn(x)  # (N, T, 64)
        return self.classifier(x).permute(1, 0, 2)  # (T, N, classes)


def load_pixels(source: str | os.PathLike | bytes | Image.Image) -> np.ndarray:
    """Read one image as uint8 RGB (75, 300, 3) the way the tutorial does: convert, then resize."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, bytes):
        import io

        image = Image.open(io.BytesIO(source))
    else:
        image = Image.open(Path(source))
    rgb = image.convert("RGB").resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def to_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, 75, 300, 3) -> normalised float32 (N, 3, 75, 300)."""
    scaled = (pixels.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(scaled.transpose(0, 3, 1, 2)))


def ctc_loss(logits: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """Mean CTC loss of (T, N, C) logits against concatenated targets; blank is class 0."""
    log_probs = logits.log_softmax(2)
    steps, count = log_probs.shape[:2]
    input_lengths = torch.full((count,), steps, dtype=torch.long)
    return F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=0, reduction="mean")


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
