"""Helpers for tests that run training as real processes: commands, polling and reading the record."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import TINY_MODEL

# TINY_MODEL as command-line flags, on one thread: a tiny model runs fastest single-threaded.
TINY_FLAGS = [
    "--height", str(TINY_MODEL["height"]),
    "--width", str(TINY_MODEL["width"]),
    "--channels", *map(str, TINY_MODEL["channels"]),
    "--rnn-hidden", str(TINY_MODEL["rnn_hidden"]),
    "--rnn-layers", str(TINY_MODEL["rnn_layers"]),
    "--batch-size", str(TINY_MODEL["batch_size"]),
    "--warmup-steps", str(TINY_MODEL["warmup_steps"]),
    "--threads", "1",
    "--no-progress",
]

# In-process settings matching TINY_FLAGS.
TINY_SETTINGS = {**TINY_MODEL, "threads": 1}

TIMESTAMP = re.compile(r"^\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\] \[(?P<level>[A-Z]+)\] (?P<message>.*)$")
EPOCH_LINE = re.compile(r"\] Epoch (\d+)/\d+ - Train Loss")


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a training subprocess: unbuffered, one OpenMP thread."""
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "captcha_ocr", *args]


def torchrun(processes: int, *args: str) -> list[str]:
    """``torchrun --standalone`` running ``python -m captcha_ocr`` in ``processes`` processes."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "-m", "captcha_ocr", *args,
    ]


def run(command: list[str], cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=cwd, env=child_env(**env), capture_output=True, text=True, timeout=timeout,
    )


def start(command: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """Start a process whose output goes to files in ``cwd`` (pipes could fill up and block it)."""
    path = cwd / f"output-{time.monotonic_ns()}.txt"
    with open(path, "wb") as stdout:
        process = subprocess.Popen(command, cwd=cwd, env=child_env(**env), stdout=stdout, stderr=subprocess.STDOUT)
    process.output_path = path  # type: ignore[attr-defined]
    return process


def output_of(process: subprocess.Popen) -> str:
    return process.output_path.read_text(encoding="utf-8", errors="replace")  # type: ignore[attr-defined]


def finish(process: subprocess.Popen, timeout: float = 90) -> tuple[int, str]:
    """Wait for ``process`` and return its exit code and output; kill it if it overruns."""
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"process did not finish in {timeout}s; output:\n{output_of(process)}") from None
    return code, output_of(process)


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, timeout: float, what: str) -> None:
    """Poll ``condition`` every 20 ms; fail early if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"process exited ({process.returncode}) before {what}:\n{output_of(process)}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{output_of(process)}")
        time.sleep(0.02)


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl, ignoring a last line still being written."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def metrics_epochs(run_dir: Path) -> list[int]:
    return [row["epoch"] for row in metrics_rows(run_dir)]


def logged_epochs(log_file: Path) -> list[int]:
    """Epoch numbers of the log's ``Epoch N/M - Train Loss`` lines, in order."""
    return [int(m.group(1)) for m in EPOCH_LINE.finditer(log_file.read_text(encoding="utf-8"))]


def only_run(output_dir: Path) -> tuple[str, Path, Path]:
    """The session ID, log file and run folder of the single run in ``output_dir``."""
    logs = sorted((output_dir / "logs").glob("training_*.log"))
    runs = sorted(p for p in (output_dir / "runs").iterdir() if p.is_dir())
    assert len(logs) == 1, logs
    assert len(runs) == 1, runs
    session_id = runs[0].name
    assert logs[0].name == f"training_{session_id}.log"
    return session_id, logs[0], runs[0]


def wait_for_run(output_dir: Path, process: subprocess.Popen, timeout: float = 60) -> Path:
    """Wait until the process has reserved its run folder and return it."""
    runs = output_dir / "runs"
    wait_until(lambda: runs.is_dir() and any(runs.iterdir()), process, timeout, "the run folder")
    return next(runs.iterdir())


def messages(log_file: Path) -> list[tuple[str, str]]:
    """(level, message) of every log line, without the timestamps."""
    found = []
    for line in log_file.read_text(encoding="utf-8").splitlines():
        match = TIMESTAMP.match(line)
        assert match, f"line without the log format: {line!r}"
        found.append((match["level"], match["message"]))
    return found


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
