"""Reading speed and accuracy of a trained model against the ddddocr package.

Every engine reads the same encoded images from memory, so each timing covers
decoding, preprocessing, the network and the CTC or classifier decoding, but no
disk access:

- latency: one image per call (batch 1), median and 95th percentile after warm-up;
- throughput: images per second reading the whole set in batches of 64
  (ddddocr has no batch call, so it reads one image at a time);
- accuracy: whole-label accuracy and CER, exact and with both sides lower-cased.

Engines: our model through PyTorch, the same model through ONNX Runtime (from
``--onnx FILE``, or exported with ``captcha_ocr.export``), each reading three
shifted views of every image (the default) and one view, and
``ddddocr.DdddOcr().classification()`` with its bundled general model, which was
never trained on these sets. Run ``pip install ddddocr`` to include it.

    python bench/inference.py --model outputs/models/captcha_model_latest.pth
    python bench/inference.py --quick
"""

from __future__ import annotations

import argparse
import importlib
import io
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib import (
    OUTPUT_DIR,
    REPO_ROOT,
    default_v2_folder,
    format_table,
    generated_images,
    machine_info,
    write_result,
)

from captcha_ocr.data.generate import UNSAFE_FILE_NAME_CHARS
from captcha_ocr.data.sources import collect
from captcha_ocr.metrics import character_error_rate, sequence_accuracy
from captcha_ocr.predict import DEFAULT_VIEWS, Recognizer

DEFAULT_MODEL = REPO_ROOT / "outputs" / "models" / "captcha_model_latest.pth"
BATCH_SIZE = 64


def load_images(args: argparse.Namespace, alphabet: str) -> tuple[list[bytes], list[str], str]:
    """Encoded image bytes and labels: the first ``count`` files of the data, or generated PNGs."""
    source = Path(args.data) if args.data else default_v2_folder()
    if source is not None:
        samples = collect([source]).samples[: args.count]
        if not samples:
            raise SystemExit(f"no labelled images found in {source}")
        return [s.path.read_bytes() for s in samples], [s.label for s in samples], f"{source.name} ({len(samples)} images)"
    charset = "".join(c for c in alphabet if c not in UNSAFE_FILE_NAME_CHARS)
    drawn = generated_images(args.count, charset, args.gen_length, seed=0, size=(160, 60))
    encoded = []
    for image, _ in drawn:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded, [label for _, label in drawn], f"generated 160x60 ({len(drawn)} images, {args.gen_length} characters)"


def score(truths: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    folded_truths = [t.lower() for t in truths]
    folded_predictions = [p.lower() for p in predictions]
    return {
        "accuracy": sequence_accuracy(truths, predictions),
        "cer": character_error_rate(truths, predictions),
        "accuracy_case_folded": sequence_accuracy(folded_truths, folded_predictions),
        "cer_case_folded": character_error_rate(folded_truths, folded_predictions),
    }


def measure(
    name: str,
    read_one: Callable[[bytes], str],
    read_batch: Callable[[list[bytes]], list[str]] | None,
    images: list[bytes],
    labels: list[str],
    warmup: int,
) -> dict[str, Any]:
    """Time one engine: batch-1 latency per image, then whole-set throughput."""
    for image in images[:warmup]:
        read_one(image)
    latencies, predictions = [], []
    for image in images:
        started = time.perf_counter()
        predictions.append(read_one(image))
        latencies.append(time.perf_counter() - started)

    if read_batch is not None:
        read_batch(images[:BATCH_SIZE])
        started = time.perf_counter()
        read_batch(images)
        batch_mode = f"batches of {BATCH_SIZE}"
    else:
        started = time.perf_counter()
        for image in images:
            read_one(image)
        batch_mode = "one at a time"
    throughput = len(images) / (time.perf_counter() - started)
    milliseconds = np.array(latencies) * 1000
    return {
        "engine": name,
        "latency_median_ms": float(np.median(milliseconds)),
        "latency_p95_ms": float(np.percentile(milliseconds, 95)),
        "latency_mean_ms": float(milliseconds.mean()),
        "throughput_images_per_second": throughput,
        "throughput_mode": batch_mode,
        **score(labels, predictions),
        "examples": [{"label": t, "prediction": p} for t, p in list(zip(labels, predictions, strict=True))[:5]],
    }


def recognizer_engine(recognizer: Recognizer) -> tuple[Callable[[bytes], str], Callable[[list[bytes]], list[str]]]:
    def read_one(image: bytes) -> str:
        return recognizer.predict(image).text

    def read_batch(images: list[bytes]) -> list[str]:
        return [p.text for p in recognizer.predict_batch(images, batch_size=BATCH_SIZE)]

    return read_one, read_batch


def onnx_file(args: argparse.Namespace) -> tuple[Path | None, str]:
    """Return the ONNX file to time (the one given, or a fresh export) and how it was found.

    When there is no file, the path is None and the text gives the reason.
    """
    if args.onnx:
        return Path(args.onnx), "given"
    try:
        export = importlib.import_module("captcha_ocr.export")
    except ImportError as error:
        return None, f"no --onnx file and captcha_ocr.export cannot be imported ({error})"
    target = OUTPUT_DIR / f"{Path(args.model).stem}.onnx"
    try:
        export.export_onnx(args.model, target)
    except Exception as error:  # noqa: BLE001 - a failed export skips one engine, not the benchmark
        return None, f"export failed: {type(error).__name__}: {error}"
    return target, "exported with captcha_ocr.export"


def ddddocr_engine() -> tuple[Callable[[bytes], str] | None, str]:
    try:
        import ddddocr
    except Exception as error:  # noqa: BLE001 - any import failure only skips this engine
        return None, f"ddddocr cannot be imported ({type(error).__name__}: {error}); pip install ddddocr to include it"
    try:
        ocr = ddddocr.DdddOcr(show_ad=False)
    except Exception as error:  # noqa: BLE001
        return None, f"ddddocr failed to load its model ({type(error).__name__}: {error})"
    version = getattr(ddddocr, "__version__", None) or _distribution_version("ddddocr")
    return ocr.classification, f"ddddocr {version}, bundled model, CPU"


def _distribution_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown version"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help=f"a trained .pth model (default: {DEFAULT_MODEL})")
    parser.add_argument("--onnx", metavar="FILE", help="an exported .onnx file of the same model (default: export one)")
    parser.add_argument("--data", metavar="DIR", help="labelled folder or manifest (default: captcha_images_v2 when present, else generated images)")
    parser.add_argument("--count", type=int, default=300, help="images to read (default: 300)")
    parser.add_argument("--gen-length", type=int, default=4, help="label length of generated images (default: 4)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed reads per engine first (default: 20)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: 0, which keeps torch's own default)")
    parser.add_argument("--device", default="cpu", help="device for the PyTorch engine (default: cpu)")
    parser.add_argument("--no-ddddocr", action="store_true", help="leave ddddocr out")
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 images, a few warm-up reads")
    args = parser.parse_args()
    if args.quick:
        args.count, args.warmup = min(args.count, 40), min(args.warmup, 3)
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.model).is_file():
        raise SystemExit(f"{args.model}: model not found; train one with 'captcha-ocr train DATA' or pass --model FILE")
    recognizer = Recognizer.load(args.model, device=args.device)
    images, labels, description = load_images(args, recognizer.codec.alphabet)
    print(f"data: {description}; model: {args.model}; torch threads: {torch.get_num_threads()}", flush=True)

    results, notes = [], {}
    onnx_path, notes["onnx"] = onnx_file(args)
    # The default reads three shifted views of each image; one view is the fastest setting.
    for views in (DEFAULT_VIEWS, 1):
        label = f"{views} view" + ("s" if views > 1 else "")
        torch_reader = Recognizer.load(args.model, device=args.device, views=views)
        results.append(measure(f"ours, PyTorch, {label}", *recognizer_engine(torch_reader), images, labels, args.warmup))
        if onnx_path is not None:
            onnx_reader = Recognizer.load(onnx_path, views=views)
            results.append(measure(f"ours, ONNX Runtime, {label}", *recognizer_engine(onnx_reader), images, labels, args.warmup))
    if args.no_ddddocr:
        notes["ddddocr"] = "left out (--no-ddddocr)"
    else:
        read_one, notes["ddddocr"] = ddddocr_engine()
        if read_one is not None:
            results.append(measure("ddddocr", read_one, None, images, labels, args.warmup))
    for engine, note in notes.items():
        print(f"{engine}: {note}")

    headers = ["engine", "median ms", "p95 ms", "img/s", "throughput mode", "acc", "CER", "acc folded", "CER folded"]
    rows = [[
        r["engine"], f"{r['latency_median_ms']:.2f}", f"{r['latency_p95_ms']:.2f}",
        f"{r['throughput_images_per_second']:.1f}", r["throughput_mode"], f"{r['accuracy']:.4f}",
        f"{r['cer']:.4f}", f"{r['accuracy_case_folded']:.4f}", f"{r['cer_case_folded']:.4f}",
    ] for r in results]
    print(format_table(headers, rows))
    path = write_result("inference", {
        "machine": machine_info(args.device), "data": description, "model": args.model,
        "onnx": str(onnx_path) if onnx_path else None, "notes": notes,
        "settings": vars(args), "engines": results,
    }, args.quick)
    print(f"result: {path}")


if __name__ == "__main__":
    main()
