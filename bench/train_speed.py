"""Training throughput of the default CRNN against the common tutorial CRNN.

Both models train on the same images in one process. Measurement windows
alternate between them (and swap order every round), so a busy neighbour on the
machine slows both alike. A step is forward, loss, backward, gradient
clipping (ours only, as the trainer does) and an Adam step. Our loss is the
trainer's once the fine head is active: CTC on both heads plus the
character-presence loss. Image decoding and augmentation are left out. FLOPs
per image come from FlopCounterMode over forward and backward, and are set
against the machine's float32 torch.mm peak.

    python bench/train_speed.py            # about 5 minutes
    python bench/train_speed.py --quick    # smoke run, under a minute
    python bench/train_speed.py --profile  # also profile our training step
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import tutorial_model
from benchlib import (
    V2_CHARSET,
    default_v2_folder,
    format_table,
    generated_images,
    labelled_files,
    machine_info,
    pick_device,
    synchronize,
    write_result,
)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from captcha_ocr.charset import Codec
from captcha_ocr.config import TrainConfig
from captcha_ocr.data.images import Preprocessing, load_image, to_model_input
from captcha_ocr.model import CRNN, ModelConfig, count_parameters
from captcha_ocr.training.loop import training_loss

FLOP_COUNT_IMAGES = 2
# Our batch size: the trainer's choice for the 936 training images of a captcha_images_v2 split.
V2_BATCH = TrainConfig().batch_size_for(936)


@dataclass
class Contender:
    """A model with its optimizer, its pre-built batches and its measured windows."""

    name: str
    input_shape: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    batch_size: int
    grad_clip: float = 0.0
    # Called as loss_fn(model, images, targets, lengths). When None, the step uses CTC on the output.
    loss_fn: Callable[..., torch.Tensor] | None = None
    windows: list[tuple[int, float]] = field(default_factory=list)
    cursor: int = 0

    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.loss_fn is None:
            return _ctc_loss(model(images), targets, lengths)
        return self.loss_fn(model, images, targets, lengths)

    def step(self) -> None:
        images, targets, lengths = self.batches[self.cursor % len(self.batches)]
        self.cursor += 1
        loss = self.loss(self.model, images, targets, lengths)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        loss.item()  # both training loops read the loss every step

    def run_window(self, seconds: float, device: torch.device) -> None:
        synchronize(device)
        started = time.perf_counter()
        steps = 0
        while True:
            self.step()
            steps += 1
            synchronize(device)
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
        self.windows.append((steps * self.batch_size, elapsed))

    @property
    def images_per_second(self) -> float:
        images = sum(n for n, _ in self.windows)
        return images / sum(s for _, s in self.windows)

    def window_rates(self) -> list[float]:
        return [n / s for n, s in self.windows]


def _ctc_loss(logits: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    log_probs = logits.float().log_softmax(2)  # (T, N, C)
    steps, count = log_probs.shape[:2]
    input_lengths = torch.full((count,), steps, dtype=torch.long)
    return F.ctc_loss(log_probs, targets, input_lengths, lengths, blank=0, reduction="mean")


def trainer_loss(presence_weight: float) -> Callable[..., torch.Tensor]:
    """Return the loss our trainer minimises once the fine head is active: the most work per step."""

    def loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        coarse, fine = model(images, both_heads=True)
        total, _ = training_loss(coarse, fine, targets, lengths, presence_weight=presence_weight, fine_active=True)
        return total

    return loss


def load_images(args: argparse.Namespace) -> tuple[list[Any], list[str], str]:
    """Return image sources (paths or PIL images), labels, and a description of the set."""
    folder = Path(args.data) if args.data else default_v2_folder()
    if folder is not None:
        samples = labelled_files(folder)[: args.pool]
        return [s.path for s in samples], [s.label for s in samples], f"{folder.name} ({len(samples)} images)"
    drawn = generated_images(args.pool, V2_CHARSET, 5, seed=0)
    return [image for image, _ in drawn], [label for _, label in drawn], f"generated 200x50 ({len(drawn)} images)"


def make_batches(inputs: torch.Tensor, labels: list[str], codec: Codec, batch_size: int, device: torch.device):
    batches = []
    for start in range(0, len(labels) - batch_size + 1, batch_size):
        chunk = labels[start : start + batch_size]
        targets = torch.tensor([c for label in chunk for c in codec.encode(label)], dtype=torch.long)
        lengths = torch.tensor([len(label) for label in chunk], dtype=torch.long)
        batches.append((inputs[start : start + batch_size].to(device), targets.to(device), lengths))
    if not batches:
        raise SystemExit(f"need at least {batch_size} images to build one batch, got {len(labels)}")
    return batches


def build_ours(sources: list[Any], labels: list[str], codec: Codec, device: torch.device, batch_size: int) -> Contender:
    config = TrainConfig()
    preprocessing = Preprocessing(height=config.height, width=config.width)
    pixels = np.stack([load_image(source, preprocessing) for source in sources])
    inputs = torch.from_numpy(to_model_input(pixels, preprocessing))
    model_config = ModelConfig(
        num_classes=codec.num_classes, height=config.height, width=config.width,
        channels=tuple(config.channels), rnn_hidden=config.rnn_hidden,
        rnn_layers=config.rnn_layers, dropout=config.dropout,
    )
    model = CRNN(model_config).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return Contender(
        "ours (CRNN)", f"1x{config.height}x{config.width}", model, optimizer,
        make_batches(inputs, labels, codec, batch_size, device), batch_size, config.grad_clip,
        trainer_loss(config.presence_weight),
    )


def build_tutorial(sources: list[Any], labels: list[str], codec: Codec, device: torch.device) -> Contender:
    pixels = np.stack([tutorial_model.load_pixels(source) for source in sources])
    inputs = tutorial_model.to_input(pixels)
    model = tutorial_model.TutorialCRNN(codec.num_classes).to(device).train()
    batch_size = tutorial_model.BATCH_SIZE
    return Contender(
        "tutorial", f"3x{tutorial_model.HEIGHT}x{tutorial_model.WIDTH}", model,
        tutorial_model.make_optimizer(model), make_batches(inputs, labels, codec, batch_size, device), batch_size,
    )


def count_flops(contender: Contender) -> dict[str, float]:
    """Count the FLOPs per image of the forward pass and of forward plus backward.

    The count runs on a CPU copy because the CUDA GRU is one cuDNN call that
    FlopCounterMode cannot see into, while the CPU GRU decomposes into counted matmuls.
    NOTE: PyTorch 2.13 runs a CPU LSTM as fused oneDNN calls that FlopCounterMode
    counts as 0, so our model's LSTM layers are missing from its count.
    Counted FLOPs (convolutions and matmuls) grow linearly with the batch, so
    two images give the per-image figure at a fraction of the counter's cost.
    """
    model = _cpu_copy(contender.model)
    images, targets, lengths = (t.cpu() for t in contender.batches[0])
    images, lengths = images[:FLOP_COUNT_IMAGES], lengths[:FLOP_COUNT_IMAGES]
    targets = targets[: int(lengths.sum())]
    with FlopCounterMode(display=False) as forward_counter:
        loss = contender.loss(model, images, targets, lengths)
    with FlopCounterMode(display=False) as backward_counter:
        loss.backward()
    forward = forward_counter.get_total_flops() / len(lengths)
    backward = backward_counter.get_total_flops() / len(lengths)
    return {"forward": forward, "train": forward + backward}


def _cpu_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).cpu().train()


def matmul_peak(size: int, reps: int, device: torch.device) -> dict[str, float]:
    """Measure the best and median float32 torch.mm rate, in FLOP/s, over ``reps`` timed products."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    for _ in range(2):
        torch.mm(a, b)
    synchronize(device)
    rates = []
    for _ in range(reps):
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        rates.append(2 * size**3 / (time.perf_counter() - started))
    return {"best": max(rates), "median": statistics.median(rates)}


def measure(contenders: list[Contender], args: argparse.Namespace, device: torch.device) -> None:
    for contender in contenders:
        for _ in range(args.warmup_steps):
            contender.step()
    synchronize(device)
    for round_number in range(args.windows):
        order = contenders if round_number % 2 == 0 else contenders[::-1]
        for contender in order:
            contender.run_window(args.window_seconds, device)


def profile_ours(contender: Contender, steps: int, rows: int) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            contender.step()
    averages = profiler.key_averages()
    print(f"\nProfile of {steps} training steps of {contender.name}, top {rows} by self CPU time:")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return [
        {"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000, "cpu_total_ms": e.cpu_time_total / 1000}
        for e in top
    ]


def report(contenders: list[Contender], flops: dict[str, dict[str, float]], peak: float) -> list[dict[str, Any]]:
    rows, table = [], []
    for c in contenders:
        rate = c.images_per_second
        achieved = flops[c.name]["train"] * rate
        windows = c.window_rates()
        rows.append({
            "model": c.name, "input": c.input_shape, "batch_size": c.batch_size,
            "parameters": count_parameters(c.model), "images_per_second": rate,
            "window_images_per_second": windows, "steps": c.cursor,
            "forward_flops_per_image": flops[c.name]["forward"], "train_flops_per_image": flops[c.name]["train"],
            "achieved_flops_per_second": achieved, "fraction_of_matmul_peak": achieved / peak,
        })
        table.append([
            c.name, c.input_shape, c.batch_size, f"{count_parameters(c.model):,}",
            f"{flops[c.name]['train'] / 1e9:.3f}", f"{rate:.1f}", f"{min(windows):.1f}-{max(windows):.1f}",
            f"{achieved / 1e9:.1f}", f"{100 * achieved / peak:.1f}%",
        ])
    headers = ["model", "input", "batch", "params", "train GFLOP/img", "img/s", "window range", "GFLOP/s", "of mm peak"]
    print(format_table(headers, table))
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", metavar="DIR", help="labelled image folder (default: captcha_images_v2 when present, else generated images)")
    parser.add_argument(
        "--batch-size", type=int, default=V2_BATCH,
        help=f"our batch size (default: {V2_BATCH}, what the trainer chooses for captcha_images_v2's 936 training images)",
    )
    parser.add_argument("--pool", type=int, default=256, help="images held in memory and cycled through (default: 256)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: 0, which keeps torch's own default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--windows", type=int, default=10, help="measurement windows per model (default: 10)")
    parser.add_argument("--window-seconds", type=float, default=12.0, help="length of one window (default: 12)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="untimed steps per model first (default: 10)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the square torch.mm operands (default: 2048)")
    parser.add_argument("--matmul-reps", type=int, default=10, help="timed torch.mm products, before and after training (default: 10)")
    parser.add_argument("--profile", action="store_true", help="also profile our training step with torch.profiler")
    parser.add_argument("--profile-steps", type=int, default=20, help="steps under the profiler (default: 20)")
    parser.add_argument("--quick", action="store_true", help="smoke run: a few short windows, under a minute")
    args = parser.parse_args()
    if args.quick:
        args.pool, args.windows, args.window_seconds = 64, 2, 1.0
        args.warmup_steps, args.matmul_reps, args.profile_steps = 1, 3, 2
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(0)
    sources, labels, data_description = load_images(args)
    codec = Codec.from_labels(labels)
    contenders = [build_ours(sources, labels, codec, device, args.batch_size), build_tutorial(sources, labels, codec, device)]
    print(f"data: {data_description}; classes: {codec.num_classes}; device: {device}; torch threads: {torch.get_num_threads()}")

    flops = {c.name: count_flops(c) for c in contenders}
    peak_before = matmul_peak(args.matmul_size, args.matmul_reps, device)
    measure(contenders, args, device)
    peak_after = matmul_peak(args.matmul_size, args.matmul_reps, device)
    peak = max(peak_before["best"], peak_after["best"])
    print(f"float32 torch.mm {args.matmul_size}x{args.matmul_size} peak: {peak / 1e9:.1f} GFLOP/s "
          f"(best before {peak_before['best'] / 1e9:.1f}, after {peak_after['best'] / 1e9:.1f})")
    rows = report(contenders, flops, peak)
    ratio = contenders[0].images_per_second / contenders[1].images_per_second
    print(f"ours / tutorial images per second: {ratio:.2f}x")

    profile_rows = profile_ours(contenders[0], args.profile_steps, 20) if args.profile else None
    path = write_result("train_speed", {
        "machine": machine_info(str(device)),
        "data": data_description,
        "settings": {k: v for k, v in vars(args).items() if k != "profile"},
        "matmul_peak_flops_per_second": peak,
        "matmul_before": peak_before,
        "matmul_after": peak_after,
        "models": rows,
        "ours_over_tutorial": ratio,
        "profile": profile_rows,
    }, args.quick)
    print(f"result: {path}")


if __name__ == "__main__":
    main()
