"""Past runs read back from their folders: list, show, compare and plot.

Everything here reads ``outputs/runs/<ID>/summary.json``, ``config.json`` and
``metrics.jsonl`` and nothing else, so it works on runs that completed, failed,
were interrupted or are still running, and on folders copied from another
machine. Accuracies print as the training log writes them, ``0.9615 (96.2%)``,
so ``runs list`` and ``grep "Final accuracy" outputs/logs/training_*.log``
agree digit for digit.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_ID_PATTERN = re.compile(r"(\d{8}_\d{6})(?:_(\d+))?")

# Curves drawn by plot_runs: (metrics.jsonl keys, axis title, logarithmic y axis, fixed y range).
PLOT_PANELS = (
    (("train_loss", "val_loss"), "CTC loss (solid: train, dashed: validation)", False, None),
    (("val_accuracy",), "Validation accuracy (whole label)", False, (-0.02, 1.02)),
    (("val_cer",), "Validation character error rate", False, None),
    (("lr",), "Learning rate", True, None),
)

PLOT_MARKERS = ("o", "s", "^", "D", "v", "P", "X")

# --------------------------------------------------------------------- run IDs
def run_sort_key(run_id: str) -> tuple[str, int]:
    """Order run IDs by start time; ``20240316_143022_2`` comes after ``20240316_143022``."""
    match = RUN_ID_PATTERN.fullmatch(run_id)
    if not match:
        return (run_id, 0)
    return (match.group(1), int(match.group(2) or 1))


def run_ids(runs_dir: Path) -> list[str]:
    """Return the name of every run folder in ``runs_dir``, oldest first."""
    if not runs_dir.is_dir():
        return []
    names = [p.name for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(names, key=run_sort_key)


def resolve_run_id(reference: str, runs_dir: Path) -> str:
    """Turn 'latest', a full run ID or a unique ID prefix into a run ID."""
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"no runs found: {runs_dir} does not exist")
    ids = run_ids(runs_dir)
    if reference == "latest":
        if not ids:
            raise FileNotFoundError(f"no runs found in {runs_dir}")
        return ids[-1]
    if reference in ids:
        return reference
    matches = [i for i in ids if i.startswith(reference)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise FileNotFoundError(f"no run matches {reference!r} in {runs_dir}")
    raise ValueError(f"run ID prefix {reference!r} is ambiguous: {', '.join(matches[:5])}")


# ----------------------------------------------------------------- run records
@dataclass
class RunRecord:
    """The summary, configuration and metrics read from one run folder; a missing file leaves its part empty."""

    run_id: str
    path: Path
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.summary.get("status") or "unknown"

    @property
    def final(self) -> dict[str, Any] | None:
        """The last completed epoch's metrics."""
        return self.summary.get("final") or (self.metrics[-1] if self.metrics else None)

    @property
    def best(self) -> dict[str, Any] | None:
        """The best epoch's metrics, as training chose it (accuracy, then validation loss)."""
        if self.summary.get("best"):
            return self.summary["best"]
        if not self.metrics:
            return None
        return max(self.metrics, key=lambda r: (r.get("val_accuracy", 0.0), -r.get("val_loss", math.inf)))

    @property
    def epochs_completed(self) -> int:
        return int(self.summary.get("epochs_completed") or len(self.metrics))

    @property
    def max_epochs(self) -> int | None:
        return self.summary.get("max_epochs") or self.config.get("epochs")

    @property
    def started_at(self) -> str:
        started = self.summary.get("started_at")
        if started:
            return str(started).replace("T", " ")
        match = RUN_ID_PATTERN.fullmatch(self.run_id)
        if not match:
            return "?"
        stamp = match.group(1)
        return f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]} {stamp[9:11]}:{stamp[11:13]}:{stamp[13:15]}"

    @property
    def data(self) -> list[str]:
        return list(self.summary.get("data", self.config.get("data", [])) or [])


def _read_json_file(path: Path, problems: list[str]) -> dict[str, Any]:
    if not path.is_file():
        problems.append(f"{path.name} missing")
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        problems.append(f"{path.name} unreadable ({error})")
        return {}
    return value if isinstance(value, dict) else {}


def read_metrics(path: Path, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """Read the rows of ``metrics.jsonl``, leaving out unreadable lines such as the half-written last line of a running run."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if problems is not None:
                problems.append(f"metrics.jsonl line {number} unreadable")
            continue
        if isinstance(row, dict) and "epoch" in row:
            rows.append(row)
    return rows


def load_run(runs_dir: Path, run_id: str) -> RunRecord:
    path = runs_dir / run_id
    problems: list[str] = []
    summary = _read_json_file(path / "summary.json", problems)
    config_file = _read_json_file(path / "config.json", problems)
    return RunRecord(
        run_id=run_id, path=path, summary=summary,
        config=config_file.get("config", {}), command=list(config_file.get("command", [])),
        metrics=read_metrics(path / "metrics.jsonl", problems), problems=problems,
    )


def load_runs(runs_dir: Path, references: Sequence[str]) -> list[RunRecord]:
    """Load runs named by ID, unique prefix or 'latest', in the order given, each once."""
    ids: list[str] = []
    for reference in references:
        run_id = resolve_run_id(reference, runs_dir)
        if run_id not in ids:
            ids.append(run_id)
    return [load_run(runs_dir, run_id) for run_id in ids]


# ------------------------------------------------------------------ formatting
def format_accuracy(value: float | None) -> str:
    """Format an accuracy as the training log's ``Final accuracy`` line does: ``0.9615 (96.2%)``."""
    if value is None:
        return "-"
    return f"{value:.4f} ({value * 100:.1f}%)"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def format_command(argv: Sequence[str]) -> str:
    """Format a recorded command line for a shell, naming the program instead of its full path."""
    program = Path(argv[0]).name if argv else ""
    if program == "__main__.py":
        program = "python -m captcha_ocr"
    return " ".join([program, *(shlex.quote(arg) for arg in argv[1:])]).strip()


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _metric(row: dict[str, Any] | None, key: str, digits: int = 4) -> str:
    if not row or row.get(key) is None:
        return "-"
    return f"{row[key]:.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Format rows as left-aligned columns separated by two spaces, with the header underlined."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)]


def describe_data(record: RunRecord, limit: int = 40) -> str:
    """Describe a run's data in a few words: the source names and the training and validation image counts."""
    names = ", ".join(Path(source).name or source for source in record.data) or "generated set"
    if len(names) > limit:
        names = names[: limit - 3] + "..."
    train, val = record.summary.get("train_count"), record.summary.get("val_count")
    return f"{names} ({train}/{val})" if train or val else names


def _epochs_text(record: RunRecord) -> str:
    return f"{record.epochs_completed}/{record.max_epochs}" if record.max_epochs else str(record.epochs_completed)


def _best_text(record: RunRecord) -> str:
    best = record.best
    if not best:
        return "-"
    return f"{best['val_accuracy']:.4f} @{best['epoch']}"


def list_lines(records: Sequence[RunRecord]) -> list[str]:
    """Build the ``runs list`` table, one run per row in the order given."""
    headers = ["ID", "STATUS", "STARTED", "EPOCHS", "BEST", "FINAL ACCURACY", "CER", "DATA (TRAIN/VAL)", "DURATION"]
    rows = []
    for record in records:
        final = record.final
        rows.append([
            record.run_id, record.status, record.started_at, _epochs_text(record), _best_text(record),
            format_accuracy(final["val_accuracy"]) if final else "-", _metric(final, "val_cer"),
            describe_data(record), format_duration(record.summary.get("total_seconds")),
        ])
    return format_table(headers, rows)


def show_lines(record: RunRecord) -> list[str]:
    """Build the lines ``runs show`` prints about one run: status, results, configuration, epochs and files."""
    summary = record.summary
    status = record.status
    if summary.get("stop_reason"):
        status += f" ({summary['stop_reason']})"
    lines = [
        f"Run {record.run_id}",
        f"  Folder:          {record.path}",
        f"  Status:          {status}",
        f"  Started:         {record.started_at}",
        f"  Duration:        {format_duration(summary.get('total_seconds'))} in all, "
        f"{format_duration(summary.get('training_seconds'))} in epochs",
        f"  Epochs:          {_epochs_text(record)}",
        f"  Data:            {', '.join(record.data) or 'generated set'}",
        f"  Images:          {summary.get('train_count', '-')} training, {summary.get('val_count', '-')} validation",
    ]
    if summary.get("charset"):
        lines.append(f"  Charset:         {summary['charset']} ({len(summary['charset'])} characters)")
    if summary.get("error"):
        lines.append(f"  Error:           {summary['error']}")
    final, best = record.final, record.best
    lines.append(f"  Final accuracy:  {format_accuracy(final['val_accuracy']) if final else '-'}"
                 + (f" at epoch {final['epoch']}, CER {_metric(final, 'val_cer')}" if final else ""))
    lines.append(f"  Best accuracy:   {format_accuracy(best['val_accuracy']) if best else '-'}"
                 + (f" at epoch {best['epoch']}, CER {_metric(best, 'val_cer')}" if best else ""))
    if record.command:
        lines.append(f"  Command:         {format_command(record.command)}")
    for problem in record.problems:
        lines.append(f"  Note:            {problem}")

    if record.config:
        lines += ["", "Configuration:"]
        width = max(len(key) for key in record.config)
        lines += [f"  {key.ljust(width)}  {format_value(value)}" for key, value in record.config.items()]
    if record.metrics:
        lines += ["", "Epochs:"]
        rows = [[
            str(row["epoch"]), _metric(row, "train_loss"), _metric(row, "val_loss"), _metric(row, "val_accuracy"),
            _metric(row, "val_cer"), f"{row['lr']:.2e}" if row.get("lr") is not None else "-",
            format_duration(row.get("epoch_time")),
        ] for row in record.metrics]
        table = format_table(["EPOCH", "TRAIN LOSS", "VAL LOSS", "ACCURACY", "CER", "LR", "TIME"], rows)
        lines += ["  " + line for line in table]
    files = _artifact_lines(record)
    if files:
        lines += ["", "Files:", *files]
    return lines


def _artifact_lines(record: RunRecord) -> list[str]:
    artifacts = record.summary.get("artifacts", {})
    lines = []
    for key, title in (("log_file", "Log"), ("model", "Model"), ("best", "Best checkpoint"), ("last", "Last checkpoint")):
        if artifacts.get(key):
            lines.append(f"  {title + ':':<17}{artifacts[key]}")
    samples = record.path / "samples"
    if samples.is_dir():
        lines.append(f"  {'Samples:':<17}{samples}")
    if (record.path / "tensorboard").is_dir():
        lines.append(f"  {'TensorBoard:':<17}{record.path / 'tensorboard'}")
    return lines


def compare_lines(records: Sequence[RunRecord], only_differences: bool = False) -> list[str]:
    """Build the settings and results of runs side by side, with ``*`` before each setting that differs."""
    keys: list[str] = []
    for record in records:
        keys += [key for key in record.config if key not in keys]
    setting_rows = []
    for key in keys:
        values = [format_value(record.config[key]) if key in record.config else "(unset)" for record in records]
        differs = len(set(values)) > 1
        if differs or not only_differences:
            setting_rows.append(["*" if differs else "", key, *values])
    result_rows = [
        ["", "status", *(r.status for r in records)],
        ["", "epochs completed", *(_epochs_text(r) for r in records)],
        ["", "final accuracy", *(format_accuracy(r.final["val_accuracy"]) if r.final else "-" for r in records)],
        ["", "final CER", *(_metric(r.final, "val_cer") for r in records)],
        ["", "final val loss", *(_metric(r.final, "val_loss") for r in records)],
        ["", "best accuracy", *(format_accuracy(r.best["val_accuracy"]) if r.best else "-" for r in records)],
        ["", "best epoch", *(str(r.best["epoch"]) if r.best else "-" for r in records)],
        ["", "images (train/val)", *(f"{r.summary.get('train_count', '-')}/{r.summary.get('val_count', '-')}" for r in records)],
        ["", "duration", *(format_duration(r.summary.get("total_seconds")) for r in records)],
    ]
    headers = ["", "SETTING", *(r.run_id for r in records)]
    spacer = [""] * len(headers)
    table = format_table(headers, [*setting_rows, spacer, ["", "RESULT", *([""] * len(records))], *result_rows])
    table[1] = " " + table[1][1:]  # no rule under the column of * marks
    differing = sum(1 for row in setting_rows if row[0])
    return [*table, "", f"{differing} of {len(keys)} settings differ (marked *)"]


# ---------------------------------------------------------------------- plots
def plot_runs(records: Sequence[RunRecord], out: Path) -> tuple[Path, list[str]]:
    """Draw loss, accuracy, CER and learning rate against epoch for several runs in one PNG.

    Returns the file written and the IDs of runs left out because no epoch of
    theirs completed. The figure is drawn on Matplotlib's Agg canvas, so it needs no display
    and leaves the global backend setting alone.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: in the captcha-ocr checkout, pip install -e '.[plot]'") from None
    drawn = [r for r in records if r.metrics]
    left_out = [r.run_id for r in records if not r.metrics]
    if not drawn:
        raise ValueError(f"nothing to plot: no completed epoch in {', '.join(left_out)}")

    figure = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2, sharex=True).ravel()
    colours = [f"C{i % 10}" for i in range(len(drawn))]
    # A marker shape per run keeps runs apart where their curves lie on top of each other.
    markers = [PLOT_MARKERS[i % len(PLOT_MARKERS)] for i in range(len(drawn))]
    for axis, (keys, title, log_scale, y_range) in zip(axes, PLOT_PANELS, strict=True):
        for record, colour, marker in zip(drawn, colours, markers, strict=True):
            for key, style in zip(keys, ("-", "--"), strict=False):
                points = [(row["epoch"], row[key]) for row in record.metrics if _finite(row.get(key))]
                if not points:
                    continue
                epochs, values = zip(*points, strict=True)
                label = record.run_id if key == keys[0] else None
                axis.plot(epochs, values, style, color=colour, marker=marker, markersize=5, fillstyle="none", label=label)
        axis.set_title(title, fontsize=10)
        axis.grid(True, alpha=0.3)
        if log_scale:
            axis.set_yscale("log")
        if y_range:
            axis.set_ylim(*y_range)
    for axis in axes[2:]:
        axis.set_xlabel("epoch")
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=8)
    figure.suptitle("Training curves: " + ", ".join(r.run_id for r in drawn), fontsize=11)

    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        figure.savefig(temporary, format="png", dpi=100)
        os.replace(temporary, out)
    finally:
        if temporary.exists():
            temporary.unlink()
    return out, left_out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
