"""Accuracy reached in a fixed training-time budget.

Suites:

- ``captcha_images_v2``: the 1040 real images, 90/10 splits drawn with
  ``--splits`` different seeds, at most 5 minutes each. Reports the held-out
  whole-label accuracy and CER of the last epoch per split and their mean,
  and the training time at which the held-out accuracy first reached 90% and 95%.
  The training log reads each image once; the last epoch's weights are also
  scored as ``predict`` reads by default, with three shifted views.
- ``gen36``: generated 160x60 images with 4 characters from 0-9A-Z, 60 minutes,
  scored on a separately generated test set.
- ``gen62``: generated 160x60 images with 5 characters from 0-9a-zA-Z,
  60 minutes, scored on a test set exactly and with case folded.

Our trainer keeps its own epoch limit (``--epochs`` changes it), so a run
ends at that limit or at the budget, whichever comes first.

``--model tutorial`` trains the common tutorial CRNN for the same budget on the
same data and split, with a small loop in this file. ``--model both`` runs ours,
then the tutorial. The result file is rewritten after every run, so an
interrupted benchmark keeps what finished.

    python bench/accuracy.py --suite captcha_images_v2 --model both
    python bench/accuracy.py --suite gen36 --quick
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tutorial_model
from benchlib import (
    OUTPUT_DIR,
    default_v2_folder,
    format_table,
    machine_info,
    pick_device,
    write_result,
)

from captcha_ocr.charset import Codec, resolve_charset
from captcha_ocr.config import TrainConfig, parse_duration
from captcha_ocr.data.dataset import split_indices
from captcha_ocr.data.generate import GenerateSettings, generate
from captcha_ocr.data.sources import Sample, collect
from captcha_ocr.metrics import character_error_rate, sequence_accuracy

VAL_SPLIT = 0.1
THRESHOLDS = (0.90, 0.95)
TEST_SEED_OFFSET = 1_000_003
TEST_COLUMNS = {
    "accuracy": "test acc", "cer": "test CER",
    "accuracy_case_folded": "test acc folded", "cer_case_folded": "test CER folded",
}


@dataclass(frozen=True)
class Suite:
    name: str
    budget: str
    splits: int
    charset: str | None = None
    length: int = 0
    count: int = 0
    test_count: int = 0
    case_folded: bool = False

    @property
    def generated(self) -> bool:
        return self.count > 0


SUITES = {
    "captcha_images_v2": Suite("captcha_images_v2", budget="5m", splits=5),
    "gen36": Suite("gen36", budget="60m", splits=1, charset="alnum_upper", length=4, count=50_000, test_count=5_000),
    "gen62": Suite("gen62", budget="60m", splits=1, charset="alnum", length=5, count=50_000, test_count=5_000, case_folded=True),
}
QUICK = {"budget": "5s", "v2_images": 32, "splits": 1, "count": 32, "test_count": 16}


@dataclass
class SuiteData:
    """Training sources, the labelled samples behind them in training order, and a test set."""

    sources: list[str]
    samples: list[Sample]
    test: list[Sample]
    charset: str | None
    description: str


# ---------------------------------------------------------------- data
def v2_data(args: argparse.Namespace) -> SuiteData:
    folder = Path(args.data) if args.data else default_v2_folder()
    if folder is None or not folder.is_dir():
        raise SystemExit("captcha_images_v2 not found: give its folder with --data DIR")
    samples = collect([folder]).samples
    if args.quick:
        samples = samples[: QUICK["v2_images"]]
        manifest = write_manifest(args.output_dir / "data" / f"{folder.name}_first{len(samples)}.csv", samples)
        return SuiteData([str(manifest)], samples, [], None, f"{folder.name}, first {len(samples)} images")
    return SuiteData([str(folder)], samples, [], None, f"{folder.name} ({len(samples)} images)")


def write_manifest(path: Path, samples: list[Sample]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows((str(s.path.resolve()), s.label) for s in samples)
    return path


def generated_set(root: Path, suite: Suite, count: int, seed: int) -> Path:
    """Generate a labelled set under ``root`` unless it exists, and return its manifest."""
    folder = root / f"{suite.name}_{count}_seed{seed}"
    manifest = folder / "labels.csv"
    if manifest.is_file():
        return manifest
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    settings = GenerateSettings(
        count=count, min_length=suite.length, max_length=suite.length,
        charset=suite.charset, width=160, height=60, seed=seed,
    )
    print(f"generating {count} images in {folder}", flush=True)
    generate(partial, settings, progress=True)
    partial.rename(folder)
    return manifest


def gen_data(suite: Suite, args: argparse.Namespace) -> SuiteData:
    root = args.output_dir / "data"
    train_manifest = generated_set(root, suite, args.count, args.seed)
    test_manifest = generated_set(root, suite, args.test_count, args.seed + TEST_SEED_OFFSET)
    samples = collect([train_manifest]).samples
    test = collect([test_manifest]).samples
    description = f"{suite.name}: {len(samples)} generated images for training and validation, {len(test)} for testing"
    return SuiteData([str(train_manifest)], samples, test, suite.charset, description)


# ---------------------------------------------------------------- scoring
def score(truths: list[str], predictions: list[str], case_folded: bool) -> dict[str, float]:
    scores = {
        "accuracy": sequence_accuracy(truths, predictions),
        "cer": character_error_rate(truths, predictions),
    }
    if case_folded:
        lower_truths, lower_predictions = [t.lower() for t in truths], [p.lower() for p in predictions]
        scores["accuracy_case_folded"] = sequence_accuracy(lower_truths, lower_predictions)
        scores["cer_case_folded"] = character_error_rate(lower_truths, lower_predictions)
    return scores


def time_to(history: list[dict[str, Any]], threshold: float) -> float | None:
    """Return the training seconds at the end of the first epoch whose held-out accuracy reached ``threshold``."""
    return next((row["elapsed"] for row in history if row["val_accuracy"] >= threshold), None)


def summarise_history(history: list[dict[str, Any]]) -> dict[str, Any]:
    final = history[-1]
    best = max(history, key=lambda row: row["val_accuracy"])
    return {
        "epochs": final["epoch"],
        "training_seconds": final["elapsed"],
        "final_val_accuracy": final["val_accuracy"],
        "final_val_cer": final["val_cer"],
        "best_val_accuracy": best["val_accuracy"],
        "best_epoch": best["epoch"],
        **{f"seconds_to_{round(t * 100)}": time_to(history, t) for t in THRESHOLDS},
    }


# ---------------------------------------------------------------- our trainer
def read_held_out(run_dir: Path, samples: list[Sample], seed: int, val_count: int, args: argparse.Namespace) -> dict[str, Any]:
    """Read the held-out split with the last epoch's weights, as ``predict`` does (three views) and with one view.

    The training log scores each epoch with one view; ``predict`` reads three
    shifted views by default. The split is the trainer's: the same seed and
    fraction over the same samples in the same order.
    """
    from captcha_ocr.predict import DEFAULT_VIEWS, Recognizer

    _, val_index = split_indices(len(samples), VAL_SPLIT, seed)
    if len(val_index) != val_count:
        raise SystemExit(f"the trainer held out {val_count} images, this split {len(val_index)}: the samples differ")
    held_out = [samples[i] for i in val_index]
    truths = [s.label for s in held_out]
    device = None if args.device == "auto" else args.device
    reader = Recognizer.load(run_dir / "checkpoints" / "last.pt", device=device)
    pixels = np.stack([reader.pixels(s.path) for s in held_out])
    scores: dict[str, Any] = {"held_out_views": DEFAULT_VIEWS}
    for views, prefix in ((DEFAULT_VIEWS, "held_out"), (1, "held_out_one_view")):
        reader.views = views
        readings = [p.text for p in reader.predict_pixels(pixels)]
        scores[f"{prefix}_accuracy"] = sequence_accuracy(truths, readings)
        scores[f"{prefix}_cer"] = character_error_rate(truths, readings)
        scores[f"{prefix}_misread"] = [[t, r] for t, r in zip(truths, readings, strict=True) if t != r]
    return scores


def run_ours(data: SuiteData, seed: int, budget: str, args: argparse.Namespace, suite: Suite) -> dict[str, Any]:
    from captcha_ocr.predict import Recognizer
    from captcha_ocr.session import train

    settings = {
        "data": data.sources, "seed": seed, "val_split": VAL_SPLIT, "max_time": budget,
        "charset": data.charset, "device": args.device, "threads": args.threads, "output_dir": str(args.output_dir),
    }
    for name in ("epochs", "members", "channels", "rnn_hidden"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    config = TrainConfig.build(settings)
    result = train(config, console=args.verbose, progress=False)
    run = {"model": "ours", "seed": seed, "status": result.status, "run_dir": str(result.run_dir),
           "log_file": str(result.log_file), "model_path": str(result.model_path) if result.model_path else None}
    if result.status != "completed":
        return {**run, "error": result.error}
    history = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines() if line]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    run.update(summarise_history(history), train_count=summary["train_count"], val_count=summary["val_count"],
               history=history)
    if not data.test:
        run.update(read_held_out(result.run_dir, data.samples, seed, summary["val_count"], args))
        if run["held_out_one_view_accuracy"] != run["final_val_accuracy"]:
            print(f"  warning: one view read {run['held_out_one_view_accuracy']:.4f} of the held-out split, "
                  f"the training log {run['final_val_accuracy']:.4f}: the splits may differ", flush=True)
    if data.test:
        recognizer = Recognizer.load(result.model_path, device=None if args.device == "auto" else args.device)
        predictions = [p.text for p in recognizer.predict_batch([s.path for s in data.test])]
        run["test"] = score([s.label for s in data.test], predictions, suite.case_folded)
        run["test_count"] = len(data.test)
    return run


# ---------------------------------------------------------------- the tutorial model
def decode_tutorial(samples: list[Sample]) -> np.ndarray:
    """Decode all images into uint8 (N, 75, 300, 3) on a few threads."""
    pixels = np.empty((len(samples), tutorial_model.HEIGHT, tutorial_model.WIDTH, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for index, image in enumerate(pool.map(lambda s: tutorial_model.load_pixels(s.path), samples, chunksize=64)):
            pixels[index] = image
    return pixels


def tutorial_predict(model: torch.nn.Module, pixels: np.ndarray, codec: Codec, device: torch.device) -> list[str]:
    model.eval()
    texts = []
    with torch.inference_mode():
        for start in range(0, len(pixels), 64):
            logits = model(tutorial_model.to_input(pixels[start : start + 64]).to(device))  # (T, N, C)
            best = logits.argmax(2).cpu().numpy()
            texts += [codec.decode_indices(best[:, n]) for n in range(best.shape[1])]
    return texts


def tutorial_epoch(
    model, optimizer, pixels: np.ndarray, labels: list[str], codec: Codec, generator, device, deadline: float,
) -> tuple[float, int]:
    """Train one epoch, or until ``time.monotonic()`` passes ``deadline``. Returns the mean loss and the images seen."""
    model.train()
    order = torch.randperm(len(labels), generator=generator).numpy()
    loss_sum, seen = 0.0, 0
    for start in range(0, len(order), tutorial_model.BATCH_SIZE):
        if time.monotonic() >= deadline:
            break
        indices = order[start : start + tutorial_model.BATCH_SIZE]
        images = tutorial_model.to_input(pixels[indices]).to(device)
        chunk = [labels[i] for i in indices]
        targets = torch.tensor([c for label in chunk for c in codec.encode(label)], dtype=torch.long, device=device)
        lengths = torch.tensor([len(label) for label in chunk], dtype=torch.long)
        loss = tutorial_model.ctc_loss(model(images), targets, lengths)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(indices)
        seen += len(indices)
    return (loss_sum / seen if seen else math.nan), seen


def run_tutorial(data: SuiteData, seed: int, budget: str, args: argparse.Namespace, suite: Suite) -> dict[str, Any]:
    """Train the tutorial model on the split our trainer draws with this seed, for the same budget.

    Like our trainer, it validates after every epoch, counts validation in the
    elapsed time, and stops once the budget is spent or the next epoch would overrun it.
    An epoch longer than the whole budget (large sets at about 10 images per second)
    stops early, leaving time for the validation that follows.
    """
    device = pick_device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(seed)
    train_index, val_index = split_indices(len(data.samples), VAL_SPLIT, seed)
    train_samples = [data.samples[i] for i in train_index]
    val_samples = [data.samples[i] for i in val_index]
    codec = Codec(resolve_charset(data.charset)) if data.charset else Codec.from_labels(s.label for s in train_samples)
    train_pixels, val_pixels = decode_tutorial(train_samples), decode_tutorial(val_samples)
    train_labels, val_labels = [s.label for s in train_samples], [s.label for s in val_samples]

    model = tutorial_model.TutorialCRNN(codec.num_classes).to(device)
    optimizer = tutorial_model.make_optimizer(model)
    generator = torch.Generator().manual_seed(seed)
    seconds = parse_duration(budget)
    # Time a validation pass on a sample first, so a cut-short epoch leaves room for the real one.
    probe = time.monotonic()
    tutorial_predict(model, val_pixels[:64], codec, device)
    validation_estimate = (time.monotonic() - probe) * len(val_pixels) / max(1, min(64, len(val_pixels)))
    history: list[dict[str, Any]] = []
    elapsed = 0.0
    while not (history and elapsed + history[-1]["epoch_time"] > seconds):
        started = time.monotonic()
        deadline = started + max(0.0, seconds - elapsed - validation_estimate)
        loss, seen = tutorial_epoch(model, optimizer, train_pixels, train_labels, codec, generator, device, deadline)
        validation = score(val_labels, tutorial_predict(model, val_pixels, codec, device), case_folded=False)
        epoch_time = time.monotonic() - started
        elapsed += epoch_time
        history.append({"epoch": len(history) + 1, "train_loss": loss, "images_seen": seen,
                        "val_accuracy": validation["accuracy"], "val_cer": validation["cer"],
                        "epoch_time": epoch_time, "elapsed": elapsed})
        if args.verbose:
            print(f"  tutorial epoch {len(history)}: loss {loss:.4f}, val accuracy {validation['accuracy']:.4f}", flush=True)
        if elapsed >= seconds or seen < len(train_labels) or not math.isfinite(loss):
            break

    run = {"model": "tutorial", "seed": seed, "status": "completed", "train_count": len(train_samples),
           "val_count": len(val_samples), **summarise_history(history), "history": history}
    if data.test:
        test_pixels = decode_tutorial(data.test)
        predictions = tutorial_predict(model, test_pixels, codec, device)
        run["test"] = score([s.label for s in data.test], predictions, suite.case_folded)
        run["test_count"] = len(data.test)
    return run


# ---------------------------------------------------------------- report
def mean_of(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    done = [r for r in runs if r["status"] == "completed"]
    keys = ["final_val_accuracy", "final_val_cer", "best_val_accuracy", "training_seconds", "epochs"]
    means: dict[str, float | None] = {k: statistics.mean(r[k] for r in done) if done else None for k in keys}
    for threshold in THRESHOLDS:
        key = f"seconds_to_{round(threshold * 100)}"
        reached = [r[key] for r in done if r.get(key) is not None]
        means[key] = statistics.mean(reached) if len(reached) == len(done) and done else None
        means[f"splits_reaching_{round(threshold * 100)}"] = len(reached)
    if done and all("held_out_accuracy" in r for r in done):
        for key in ("held_out_accuracy", "held_out_cer"):
            means[key] = statistics.mean(r[key] for r in done)
    if done and all("test" in r for r in done):
        for key in done[0]["test"]:
            means[f"test_{key}"] = statistics.mean(r["test"][key] for r in done)
    return means


def table_rows(runs: list[dict[str, Any]], means: dict[str, Any], with_test: bool) -> tuple[list[str], list[list[Any]]]:
    headers = ["model", "seed", "train", "val", "epochs", "seconds", "val acc", "val CER", "best val acc", "t90 s", "t95 s"]
    present = {k for r in runs for k in r.get("test", {})} if with_test else set()
    test_keys = [k for k in TEST_COLUMNS if k in present]
    headers += [TEST_COLUMNS[k] for k in test_keys]
    views = next((r["held_out_views"] for r in runs if "held_out_views" in r), None)
    if views:
        headers += [f"val acc {views} views", f"val CER {views} views"]
    rows = []
    for r in runs:
        if r["status"] != "completed":
            rows.append([r["model"], r["seed"], r["status"], r.get("error", "")] + ["-"] * (len(headers) - 4))
            continue
        rows.append([
            r["model"], r["seed"], r["train_count"], r["val_count"], r["epochs"], f"{r['training_seconds']:.0f}",
            f"{r['final_val_accuracy']:.4f}", f"{r['final_val_cer']:.4f}", f"{r['best_val_accuracy']:.4f}",
            _seconds(r["seconds_to_90"]), _seconds(r["seconds_to_95"]),
        ] + [f"{r['test'][k]:.4f}" for k in test_keys]
            + ([_fraction(r.get("held_out_accuracy")), _fraction(r.get("held_out_cer"))] if views else []))
    completed = sum(r["status"] == "completed" for r in runs)
    if len(runs) > 1 and means["final_val_accuracy"] is not None:
        rows.append([
            "mean", "", "", "", f"{means['epochs']:.1f}", f"{means['training_seconds']:.0f}",
            f"{means['final_val_accuracy']:.4f}", f"{means['final_val_cer']:.4f}", f"{means['best_val_accuracy']:.4f}",
            _mean_seconds(means, 90, completed), _mean_seconds(means, 95, completed),
        ] + [_fraction(means.get(f"test_{k}")) for k in test_keys]
            + ([_fraction(means.get("held_out_accuracy")), _fraction(means.get("held_out_cer"))] if views else []))
    return headers, rows


def _seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.0f}"


def _mean_seconds(means: dict[str, Any], percent: int, runs: int) -> str:
    """Format the mean time to a threshold, or how many runs reached it when not all did."""
    value = means[f"seconds_to_{percent}"]
    if value is not None:
        return f"{value:.0f}"
    return f"{means[f'splits_reaching_{percent}']}/{runs} reached"


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def shape_suffix(args: argparse.Namespace) -> str:
    """Name our model's shape options in the result file's name, so that a run with them keeps the default's file."""
    parts = []
    if args.members is not None:
        parts.append(f"members{args.members}")
    if args.channels is not None:
        parts.append("channels" + "-".join(map(str, args.channels)))
    if args.rnn_hidden is not None:
        parts.append(f"hidden{args.rnn_hidden}")
    return "".join(f"_{part}" for part in parts)


def run_suite(suite: Suite, model: str, data: SuiteData, args: argparse.Namespace) -> None:
    runner = run_ours if model == "ours" else run_tutorial
    name = f"accuracy_{suite.name}_{model}{shape_suffix(args) if model == 'ours' else ''}"
    runs: list[dict[str, Any]] = []
    for split in range(args.splits):
        seed = args.seed + split
        print(f"[{time.strftime('%H:%M:%S')}] {model}: split {split + 1}/{args.splits} (seed {seed}), budget {args.budget}", flush=True)
        runs.append(runner(data, seed, args.budget, args, suite))
        means = mean_of(runs)
        path = write_result(name, {
            "suite": suite.name, "model": model, "data": data.description,
            "budget_seconds": parse_duration(args.budget), "splits_planned": args.splits,
            "machine": machine_info(str(pick_device(args.device))), "settings": _settings(args), "runs": runs, "mean": means,
        }, args.quick)
        if args.splits > 1:
            headers, rows = table_rows(runs[-1:], means, bool(data.test))
            print(format_table(headers, rows), flush=True)
    headers, rows = table_rows(runs, mean_of(runs), bool(data.test))
    print(f"\n{suite.name}, {model}, budget {args.budget} per run:")
    print(format_table(headers, rows))
    print(f"result: {path}")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--model", default="ours", choices=("ours", "tutorial", "both"), help="default: ours")
    parser.add_argument("--budget", help="training time per run, such as 5m or 1h (default: 5m for captcha_images_v2, 60m for the generated suites)")
    parser.add_argument("--splits", type=int, help="runs with seeds seed, seed+1, ... (default: 5 for captcha_images_v2, else 1)")
    parser.add_argument("--epochs", type=int, help=f"epoch limit of our trainer (default: its own, {TrainConfig().epochs}); the budget ends a run sooner when it runs out first")
    defaults = TrainConfig()
    parser.add_argument("--members", type=int, help=f"networks per model of our trainer (default: its own, {defaults.members})")
    parser.add_argument("--channels", type=int, nargs=5, metavar="C", help=f"convolution channels of our model (default: its own, {' '.join(map(str, defaults.channels))})")
    parser.add_argument("--rnn-hidden", type=int, metavar="N", help=f"LSTM units per direction of our model (default: its own, {defaults.rnn_hidden})")
    parser.add_argument("--seed", type=int, default=42, help="first seed (default: 42)")
    parser.add_argument("--count", type=int, help="generated images for training and validation (default: 50000)")
    parser.add_argument("--test-count", type=int, help="generated test images (default: 5000)")
    parser.add_argument("--data", metavar="DIR", help="the captcha_images_v2 folder (default: found beside the checkout)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: 0, one per core)")
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR, help=f"runs, logs, models and generated sets (default: {OUTPUT_DIR})")
    parser.add_argument("--verbose", action="store_true", help="show the training log on the console")
    parser.add_argument("--quick", action="store_true", help="smoke run: a few dozen images, a few seconds per run")
    args = parser.parse_args()
    suite = SUITES[args.suite]
    quick = args.quick
    args.budget = args.budget or (QUICK["budget"] if quick else suite.budget)
    args.splits = args.splits or (min(suite.splits, QUICK["splits"]) if quick else suite.splits)
    args.count = args.count or (QUICK["count"] if quick else suite.count)
    args.test_count = args.test_count or (QUICK["test_count"] if quick else suite.test_count)
    try:
        parse_duration(args.budget)
    except ValueError as error:
        parser.error(str(error))
    return args


def main() -> None:
    args = parse_args()
    suite = SUITES[args.suite]
    data = gen_data(suite, args) if suite.generated else v2_data(args)
    print(f"data: {data.description}; budget {args.budget} per run; {args.splits} run(s) per model")
    models = ["ours", "tutorial"] if args.model == "both" else [args.model]
    for model in models:
        run_suite(suite, model, data, args)


if __name__ == "__main__":
    main()
