"""Helpers shared by the benchmark scripts: data, machine description, tables, result files."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from captcha_ocr.data.sources import Sample, collect
from captcha_ocr.record.run import write_json

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
OUTPUT_DIR = REPO_ROOT / "outputs" / "bench"
# The real captcha_images_v2 set, when it sits in the data folder beside the checkout.
CAPTCHA_IMAGES_V2 = REPO_ROOT.parent / "shared" / "data" / "captcha_images_v2"
V2_CHARSET = "2345678bcdefgmnpwxy"


def default_v2_folder() -> Path | None:
    return CAPTCHA_IMAGES_V2 if CAPTCHA_IMAGES_V2.is_dir() else None


def labelled_files(folder: Path) -> list[Sample]:
    """Return every image below ``folder`` with its label, in the order training uses."""
    collected = collect([folder])
    if not collected.samples:
        raise SystemExit(f"no labelled images found in {folder}")
    return collected.samples


def generated_images(count: int, charset: str, length: int, seed: int, size: tuple[int, int] = (200, 50)) -> list[tuple[Any, str]]:
    """Draw ``count`` CAPTCHAs in memory as (PIL image, label) pairs."""
    from captcha.image import ImageCaptcha

    from captcha_ocr.data.generate import GenerateSettings, make_labels

    settings = GenerateSettings(count=count, min_length=length, max_length=length, charset=charset, seed=seed)
    drawer = ImageCaptcha(width=size[0], height=size[1])
    return [(drawer.generate_image(label), label) for label in make_labels(settings)]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    info = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_device(request: str) -> torch.device:
    if request == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(request)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {request}: CUDA is not available on this machine")
    return device


def write_result(name: str, payload: dict[str, Any], quick: bool) -> Path:
    """Write one result file; smoke runs go to results/quick/ so they never replace real results."""
    folder = RESULTS_DIR / "quick" if quick else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    write_json(path, {"quick": quick, **payload})
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Format rows as a plain-text table with right-aligned columns and floats to 4 digits."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
