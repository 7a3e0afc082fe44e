"""The recognizer network: a small CNN, bidirectional LSTM layers and a CTC head."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from captcha_ocr.config import MAX_MEMBERS

# The CNN halves the height and the width four times each.
HEIGHT_REDUCTION = 16
WIDTH_REDUCTION = 16
# The fine head emits this many output steps per CNN feature column.
FINE_STEPS_PER_COLUMN = 2


@dataclass(frozen=True)
class ModelConfig:
    """Architecture settings; stored in every checkpoint so a model can be rebuilt."""

    num_classes: int
    height: int = 48
    width: int = 192
    channels: tuple[int, ...] = field(default=(16, 32, 64, 64, 96))
    rnn_hidden: int = 128
    rnn_layers: int = 2
    dropout: float = 0.2
    # 2 gives a coarse head and a fine head. 1 gives the coarse head alone,
    # the layout of models saved before the fine head existed.
    steps_per_column: int = FINE_STEPS_PER_COLUMN
    # Networks of this architecture trained side by side and read together
    # (see MemberSet). 1 is a single CRNN.
    members: int = 1

    def __post_init__(self) -> None:
        members = self.members
        if isinstance(members, bool) or not isinstance(members, int) or not 1 <= members <= MAX_MEMBERS:
            raise ValueError(f"members must be a whole number from 1 to {MAX_MEMBERS}, got {members!r}")
        if len(self.channels) != 5:
            raise ValueError(f"channels needs 5 values, got {list(self.channels)}")
        if self.height < HEIGHT_REDUCTION or self.height % HEIGHT_REDUCTION:
            raise ValueError(f"image height must be a multiple of {HEIGHT_REDUCTION}, got {self.height}")
        if self.width < WIDTH_REDUCTION * 2:
            raise ValueError(f"image width must be at least {WIDTH_REDUCTION * 2}, got {self.width}")
        if self.steps_per_column not in (1, FINE_STEPS_PER_COLUMN):
            raise ValueError(f"steps_per_column must be 1 or {FINE_STEPS_PER_COLUMN}, got {self.steps_per_column}")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["channels"] = list(self.channels)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        values = dict(values)
        values["channels"] = tuple(values["channels"])
        # Models saved before the fine head existed have no such key.
        values.setdefault("steps_per_column", 1)
        values.setdefault("members", 1)
        return cls(**values)


def output_steps(width: int, steps_per_column: int = FINE_STEPS_PER_COLUMN) -> int:
    """Return the number of CTC time steps the model emits for an input of this width."""
    return width // WIDTH_REDUCTION * steps_per_column


def coarse_output_steps(width: int) -> int:
    """Return the number of time steps of the coarse head: one per feature column."""
    return width // WIDTH_REDUCTION


def _conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class CRNN(nn.Module):
    """Grey images (N, 1, H, W) in, per-step class logits (T, N, C) out.

    The CNN pools the width down to one feature column per 16 pixels (12 at
    the default width of 192), and two heads read the LSTM output:

    - the coarse head emits one step per column. Few steps per character
      shorten the CTC plateau, where the model emits only blanks. On
      captcha_images_v2 after 150 steps of batch 32, 10 output steps reached
      loss 1.88 and 8.7% accuracy, while 20 steps were still at loss 3.10 and 0%.
    - the fine head emits two steps per column (24 at width 192). Text that
      fills only part of the image leaves the coarse head too few steps for a
      blank between two equal neighbours, so it reads ``mddgb`` as ``mdgb``.

    Training starts on the coarse head. :meth:`activate_fine_head` copies the
    coarse head into both halves of the fine head, which then reads the same
    text, and makes the fine head the model's output (see the training loop).
    :meth:`forward` always returns ``output_steps(width)`` steps: while the
    coarse head is the output, each of its steps is repeated, which decodes
    to the same text with the same confidence.

    The recurrent layers are LSTMs, which PyTorch 2.13 runs faster than GRUs of
    the same size on a CPU (measured on a 2-core x86-64 machine).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.members != 1:
            raise ValueError(f"CRNN expects members=1, got {config.members}. Use build_model for several members")
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
        # The coarse head. Its names predate the fine head, so older models load.
        self.classifier = nn.Linear(2 * config.rnn_hidden, config.num_classes)
        # A direct path from the CNN features to the logits, so the CNN can learn
        # characters before the LSTM does. It shortened the all-blank plateau on
        # captcha_images_v2: training loss at step 300 was 2.69 with it and 3.10
        # without (20 output steps, same seed and learning rate).
        self.shortcut = nn.Linear(config.rnn_hidden, config.num_classes)
        self.has_fine_head = config.steps_per_column > 1
        if self.has_fine_head:
            split = config.steps_per_column
            self.fine_classifier = nn.Linear(2 * config.rnn_hidden, config.num_classes * split)
            self.fine_shortcut = nn.Linear(config.rnn_hidden, config.num_classes * split)
        # A buffer, so checkpoints and exported models record which head is the output.
        self.register_buffer("fine_head_active", torch.tensor(False))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        # Models saved before the buffer existed read with the coarse head.
        state_dict.setdefault(prefix + "fine_head_active", torch.tensor(False))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def fine_active(self) -> bool:
        return bool(self.fine_head_active)

    def activate_fine_head(self) -> None:
        """Start the fine head as a copy of the coarse head and make it the output."""
        if not self.has_fine_head:
            raise RuntimeError("this model has no fine head (steps_per_column is 1)")
        split = self.config.steps_per_column
        with torch.no_grad():
            self.fine_classifier.weight.copy_(self.classifier.weight.repeat(split, 1))
            self.fine_classifier.bias.copy_(self.classifier.bias.repeat(split))
            self.fine_shortcut.weight.copy_(self.shortcut.weight.repeat(split, 1))
            self.fine_shortcut.bias.copy_(self.shortcut.bias.repeat(split))
            self.fine_head_active.fill_(True)

    def fine_head_parameters(self) -> list[nn.Parameter]:
        if not self.has_fine_head:
            return []
        return [*self.fine_classifier.parameters(), *self.fine_shortcut.parameters()]

    def member_parameters(self) -> list[list[nn.Parameter]]:
        """Return the parameters of each member network. A single CRNN is one member."""
        return [list(self.parameters())]

    def heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the coarse logits (T, N, C) and the fine logits (2T, N, C), or None without a fine head."""
        features = self.features(images)  # (N, C, H/16, W/16)
        n, c, h, w = features.shape
        # (N, C, h, T) -> (T, N, C*h): each column of the feature map is one step.
        sequence = features.permute(3, 0, 1, 2).reshape(w, n, c * h)
        projected = self.project(sequence)  # (T, N, hidden)
        context, _ = self.rnn(projected)  # (T, N, 2*hidden)
        coarse = self.classifier(context) + self.shortcut(projected)  # (T, N, classes)
        if not self.has_fine_head:
            return coarse, None
        fine = self.fine_classifier(context) + self.fine_shortcut(projected)  # (T, N, split*classes)
        split = self.config.steps_per_column
        # Step t of column c is output step c*split + t.
        fine = fine.view(w, n, split, -1).permute(0, 2, 1, 3).reshape(w * split, n, -1)
        return coarse, fine

    def forward(self, images: torch.Tensor, both_heads: bool = False, member_batches: bool = False):
        """Return the output logits (T, N, C), or ``(coarse, fine)`` when ``both_heads`` is set.

        ``both_heads`` exists for the training loss: it passes through
        DistributedDataParallel, which a separate method would bypass.
        ``member_batches`` changes nothing for a single network (see MemberSet).
        """
        coarse, fine = self.heads(images)
        if both_heads:
            return coarse, fine
        if fine is None:
            return coarse
        repeated = coarse.repeat_interleave(self.config.steps_per_column, dim=0)
        # torch.where keeps the choice inside the graph, so an exported model follows the buffer too.
        return torch.where(self.fine_head_active, fine, repeated)


class MemberSet(nn.Module):
    """Several CRNNs of one architecture, trained side by side and read together.

    Every member reads all the grey images (N, 1, H, W). The logits come out
    member after member, (T, members * N, C), so row ``m * N + i`` is member
    m's reading of image i. Shifted views have the same layout (see
    ``captcha_ocr.predict.combine_views``), so the readings are combined as
    views are. Where the members disagree, the text with the highest summed
    CTC log-likelihood wins.

    Members start from different random weights. With ``member_batches`` the
    input contains one batch per member, (members * N, 1, H, W), and member m
    reads only the m-th, so each can see its own augmentation of the images.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        single = replace(config, members=1)
        self.members = nn.ModuleList(CRNN(single) for _ in range(config.members))
        self.has_fine_head = self.members[0].has_fine_head

    @property
    def fine_active(self) -> bool:
        return self.members[0].fine_active

    def activate_fine_head(self) -> None:
        for member in self.members:
            member.activate_fine_head()

    def fine_head_parameters(self) -> list[nn.Parameter]:
        return [parameter for member in self.members for parameter in member.fine_head_parameters()]

    def member_parameters(self) -> list[list[nn.Parameter]]:
        return [list(member.parameters()) for member in self.members]

    def forward(self, images: torch.Tensor, both_heads: bool = False, member_batches: bool = False):
        """Return the members' logits (T, members * N, C), or ``(coarse, fine)`` with ``both_heads``."""
        inputs = images.chunk(len(self.members)) if member_batches else [images] * len(self.members)
        outputs = [member(batch, both_heads) for member, batch in zip(self.members, inputs, strict=True)]
        if not both_heads:
            return torch.cat(outputs, dim=1)
        coarse = torch.cat([output[0] for output in outputs], dim=1)
        fine = None if outputs[0][1] is None else torch.cat([output[1] for output in outputs], dim=1)
        return coarse, fine


def build_model(config: ModelConfig) -> CRNN | MemberSet:
    """Build one CRNN, or a MemberSet when ``config.members`` is more than 1."""
    return CRNN(config) if config.members == 1 else MemberSet(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
