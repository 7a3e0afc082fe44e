"""The run folder ``outputs/runs/<ID>/``: machine-readable files beside the log.

- ``config.json``: the resolved configuration and the command line
- ``environment.json``: versions, hardware, git state and seed
- ``data.json``: sources, counts per split, charset, label lengths, file-list hashes
- ``metrics.jsonl``: one JSON object per completed epoch, flushed as it ends
- ``summary.json``: status, best and final metrics, durations, artifact paths
- ``skipped.txt``: every input file left out, with the reason
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("captcha-ocr", "torch", "numpy", "pillow", "captcha", "rapidfuzz", "onnx", "onnxruntime", "fastapi", "uvicorn", "matplotlib")


def write_json(path: Path, value: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


class RunFolder:
    """Writes the files of one run folder; only rank 0 creates one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def write(self, name: str, value: Any) -> Path:
        path = self.path / name
        write_json(path, value)
        return path

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        with open(self.metrics_file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def rewrite_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Replace metrics.jsonl with exactly ``rows`` (used on resume)."""
        temporary = self.metrics_file.with_name(f".metrics.jsonl.tmp-{os.getpid()}")
        with open(temporary, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(temporary, self.metrics_file)

    def write_skipped(self, skipped: Iterable[tuple[Path, str]]) -> Path:
        path = self.path / "skipped.txt"
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("# file\treason\n")
            for file, reason in skipped:
                handle.write(f"{file}\t{reason}\n")
        return path


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git_state(directory: Path) -> dict[str, Any] | None:
    """Return the commit and dirty flag when ``directory`` is inside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=directory, capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def collect_environment(seed: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    import torch

    cuda: dict[str, Any] = {"available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        cuda.update(
            version=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            devices=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        )
    package_dir = Path(__file__).resolve().parent
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": cuda,
        "packages": _package_versions(),
        "git": _git_state(Path.cwd()) or _git_state(package_dir),
        "seed": seed,
        **(extra or {}),
    }
