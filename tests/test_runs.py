"""captcha-ocr runs list/show/compare/plot on two real tiny runs and on broken run folders."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from captcha_ocr.cli import main
from captcha_ocr.config import TrainConfig
from captcha_ocr.record.runs import format_accuracy, load_run, resolve_run_id, run_ids
from captcha_ocr.session import train
from tests.conftest import TINY_MODEL

RUN_FILES = ("config.json", "environment.json", "data.json", "metrics.jsonl", "summary.json", "skipped.txt")


@pytest.fixture(scope="module")
def two_runs(generated_folder, tmp_path_factory):
    """Two completed runs that differ in learning rate and epochs; the second requests TensorBoard."""
    output = tmp_path_factory.mktemp("runs")
    results = []
    for settings in ({"lr": 0.001, "epochs": 2}, {"lr": 0.003, "epochs": 3, "tensorboard": True}):
        config = TrainConfig.build(
            {"data": [str(generated_folder)], "output_dir": str(output), "val_split": 0.25, **TINY_MODEL, **settings}
        )
        result = train(config, console=False, progress=False)
        assert result.status == "completed", result.error
        results.append(result)
    assert results[0].session_id != results[1].session_id
    return results, output


def runs_cli(capsys, output, *args):
    code = main(["runs", *map(str, args), "--output-dir", str(output)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def logged_final_accuracy(log_file: Path) -> str:
    match = re.search(r"Final accuracy: (.+)$", log_file.read_text(encoding="utf-8"), re.MULTILINE)
    assert match, f"no Final accuracy line in {log_file}"
    return match.group(1)


# ------------------------------------------------------------- the run folders
@pytest.mark.slow
def test_run_folder_files(two_runs):
    results, _ = two_runs
    for result, epochs in zip(results, (2, 3), strict=True):
        for name in RUN_FILES:
            assert (result.run_dir / name).is_file(), name
        assert (result.run_dir / "checkpoints" / "last.pt").is_file()
        assert (result.run_dir / "checkpoints" / "best.pt").is_file()
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [row["epoch"] for row in rows] == list(range(1, epochs + 1))
        assert "samples" not in rows[0]


@pytest.mark.slow
def test_sample_pictures_each_epoch(two_runs):
    results, _ = two_runs
    result = results[1]
    pictures = sorted(p.name for p in (result.run_dir / "samples").iterdir())
    assert pictures == ["epoch_001.png", "epoch_002.png", "epoch_003.png"]
    with Image.open(result.run_dir / "samples" / "epoch_003.png") as image:
        assert image.format == "PNG"
        # Six samples in rows of three, each at least the model's input width.
        assert image.width >= 3 * TINY_MODEL["width"]
        assert image.height >= 2 * TINY_MODEL["height"]


@pytest.mark.slow
def test_tensorboard_missing_warns_once(two_runs):
    results, _ = two_runs
    log = results[1].log_file.read_text(encoding="utf-8")
    if importlib.util.find_spec("tensorboard") is None:
        warnings = [line for line in log.splitlines() if "[WARNING]" in line and "TensorBoard" in line]
        assert len(warnings) == 1
        assert "pip install -e '.[tensorboard]'" in warnings[0]
        assert not (results[1].run_dir / "tensorboard").exists()
    else:
        assert any((results[1].run_dir / "tensorboard").iterdir())
    assert "TensorBoard" not in results[0].log_file.read_text(encoding="utf-8")


# ------------------------------------------------------------------ runs list
@pytest.mark.slow
def test_list_matches_logged_final_accuracy(two_runs, capsys):
    results, output = two_runs
    code, out, _ = runs_cli(capsys, output, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "STATUS", "STARTED"]
    for result, epochs in zip(results, (2, 3), strict=True):
        row = next(line for line in lines if line.startswith(result.session_id))
        assert " completed " in row
        assert f" {epochs}/{epochs} " in row
        assert logged_final_accuracy(result.log_file) in row
        assert format_accuracy(result.final["val_accuracy"]) == logged_final_accuracy(result.log_file)
    # Oldest first.
    order = [line.split()[0] for line in lines[2:]]
    assert order == [results[0].session_id, results[1].session_id]


@pytest.mark.slow
def test_runs_defaults_to_list(two_runs, capsys):
    _, output = two_runs
    assert runs_cli(capsys, output)[1] == runs_cli(capsys, output, "list")[1]


def test_list_empty_folder(tmp_path, capsys):
    code, out, _ = runs_cli(capsys, tmp_path, "list")
    assert code == 0
    assert out.startswith("No runs in ")


# ------------------------------------------------------------------ runs show
@pytest.mark.slow
def test_show_latest_and_prefix(two_runs, capsys):
    results, output = two_runs
    code, out, _ = runs_cli(capsys, output, "show", "latest")
    assert code == 0
    assert out.splitlines()[0] == f"Run {results[1].session_id}"
    assert f"Final accuracy:  {logged_final_accuracy(results[1].log_file)}" in out
    assert "Configuration:" in out
    assert re.search(r"^  lr\s+0\.003$", out, re.MULTILINE)
    epoch_rows = [line for line in out.splitlines() if re.match(r"^  [123]  ", line)]
    assert len(epoch_rows) == 3
    assert str(results[1].run_dir / "samples") in out

    first = results[0].session_id
    # Two runs started in the same second share every prefix of the first ID, so
    # the full ID (an exact match wins over prefixes) is used in place of a prefix.
    prefixes = (first[:n] for n in range(8, len(first) + 1) if not results[1].session_id.startswith(first[:n]))
    prefix = next(prefixes, first)
    code, out, _ = runs_cli(capsys, output, "show", prefix)
    assert code == 0
    assert out.startswith(f"Run {first}\n")


@pytest.mark.slow
def test_bad_references_fail_cleanly(two_runs, capsys):
    results, output = two_runs
    common = results[0].session_id[:8]
    code, _, err = runs_cli(capsys, output, "show", common)
    assert code == 2
    assert "ambiguous" in err
    code, _, err = runs_cli(capsys, output, "show", "19990101")
    assert code == 2
    assert "no run matches" in err


# --------------------------------------------------------------- runs compare
@pytest.mark.slow
def test_compare_marks_differences(two_runs, capsys):
    results, output = two_runs
    ids = [r.session_id for r in results]
    code, out, _ = runs_cli(capsys, output, "compare", *ids)
    assert code == 0
    settings = out.split("RESULT")[0].splitlines()[2:]
    rows = {line.lstrip("* ").split()[0]: line for line in settings if line.strip()}
    for key in ("lr", "epochs", "tensorboard"):
        assert rows[key].startswith("*"), rows[key]
    for key in ("batch_size", "seed", "rnn_hidden"):
        assert not rows[key].startswith("*"), rows[key]
    assert re.search(r"^\*\s+lr\s+0\.001\s+0\.003$", out, re.MULTILINE)
    final_row = next(line for line in out.splitlines() if "final accuracy" in line)
    for result in results:
        assert logged_final_accuracy(result.log_file) in final_row
    assert "3 of " in out.splitlines()[-1]

    code, out, _ = runs_cli(capsys, output, "compare", *ids, "--differences")
    assert "batch_size" not in out
    assert re.search(r"^\*\s+lr\s", out, re.MULTILINE)


@pytest.mark.slow
def test_compare_needs_two_runs(two_runs, capsys):
    results, output = two_runs
    code, _, err = runs_cli(capsys, output, "compare", results[0].session_id, results[0].session_id)
    assert code == 2
    assert "two or more" in err


# ------------------------------------------------------------------ runs plot
@pytest.mark.slow
def test_plot_several_runs(two_runs, tmp_path, capsys):
    results, output = two_runs
    out_file = tmp_path / "curves.png"
    code, out, _ = runs_cli(capsys, output, "plot", results[0].session_id, "latest", "--out", out_file)
    assert code == 0
    assert out.strip() == f"Wrote {out_file}"
    with Image.open(out_file) as image:
        assert image.format == "PNG"
        assert image.width >= 800
        assert image.height >= 600


# ------------------------------------------------------ failed and running runs
def _fake_run(runs_dir: Path, run_id: str, summary: dict | None, metrics: str = "") -> None:
    folder = runs_dir / run_id
    folder.mkdir(parents=True)
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    if metrics:
        (folder / "metrics.jsonl").write_text(metrics, encoding="utf-8")


@pytest.fixture
def odd_runs(tmp_path):
    runs_dir = tmp_path / "runs"
    _fake_run(runs_dir, "20240101_100000", {
        "status": "failed", "exit_code": 2, "error": "no usable images in data/", "epochs_completed": 0,
        "max_epochs": 60, "final": None, "best": None, "data": ["data/"], "total_seconds": 0.4,
    })
    row = {"epoch": 1, "train_loss": 3.0, "val_loss": 2.5, "val_accuracy": 0.25, "val_cer": 0.5, "lr": 0.001}
    _fake_run(runs_dir, "20240101_110000", {
        "status": "running", "epochs_completed": 1, "max_epochs": 60, "final": None, "best": None, "data": [],
    }, metrics=json.dumps(row) + '\n{"epoch": 2, "train_lo')
    _fake_run(runs_dir, "20240101_120000", None)
    return tmp_path


def test_odd_runs_list_and_show(odd_runs, capsys):
    code, out, _ = runs_cli(capsys, odd_runs, "list")
    assert code == 0
    rows = out.splitlines()[2:]
    assert [row.split()[:2] for row in rows] == [
        ["20240101_100000", "failed"], ["20240101_110000", "running"], ["20240101_120000", "unknown"],
    ]
    # The running run's one complete epoch counts; its half-written line does not.
    assert "0.2500 (25.0%)" in rows[1]
    assert " 1/60 " in rows[1]
    for run_id in ("20240101_100000", "20240101_110000", "20240101_120000"):
        code, out, _ = runs_cli(capsys, odd_runs, "show", run_id)
        assert code == 0
        assert out.startswith(f"Run {run_id}")
    assert "Error:           no usable images in data/" in runs_cli(capsys, odd_runs, "show", "20240101_10")[1]
    assert "summary.json missing" in runs_cli(capsys, odd_runs, "show", "latest")[1]


def test_plot_skips_runs_without_epochs(odd_runs, tmp_path, capsys):
    out_file = tmp_path / "odd.png"
    code, out, _ = runs_cli(capsys, odd_runs, "plot", "20240101_10", "20240101_11", "--out", out_file)
    assert code == 0
    assert out_file.is_file()
    assert "Left out 20240101_100000: no completed epoch" in out
    code, _, err = runs_cli(capsys, odd_runs, "plot", "20240101_10", "--out", out_file)
    assert code == 2
    assert "nothing to plot" in err


def test_compare_without_config(odd_runs, capsys):
    code, out, _ = runs_cli(capsys, odd_runs, "compare", "20240101_10", "20240101_11")
    assert code == 0
    assert re.search(r"status\s+failed\s+running", out)


# ------------------------------------------------------------------- run IDs
def test_latest_follows_time_and_suffix(tmp_path):
    for name in ("20240101_120000", "20240101_120000_2", "20240101_120000_10", "20231231_235959", ".hidden"):
        (tmp_path / name).mkdir()
    assert run_ids(tmp_path) == ["20231231_235959", "20240101_120000", "20240101_120000_2", "20240101_120000_10"]
    assert resolve_run_id("latest", tmp_path) == "20240101_120000_10"
    assert resolve_run_id("2023", tmp_path) == "20231231_235959"
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_run_id("20240101", tmp_path)


def test_session_reexports_resolve_run_id():
    from captcha_ocr import session

    assert session.resolve_run_id is resolve_run_id


def test_load_run_copied_folder(odd_runs, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(odd_runs / "runs", copy)
    record = load_run(copy, "20240101_110000")
    assert record.status == "running"
    assert record.final["val_accuracy"] == 0.25
    assert record.best["epoch"] == 1
    assert record.epochs_completed == 1


def test_accuracy_format_matches_log_summary():
    """The list's accuracy text is the log summary's, checked on values where rounding shows."""
    import logging

    from captcha_ocr.record import report

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("test_runs.summary")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for accuracy in (0.961538, 0.99995, 0.5, 1 / 3):
        messages.clear()
        final = {"val_accuracy": accuracy, "val_cer": 0.01, "train_loss": 0.1, "val_loss": 0.2}
        report.log_summary(logger, {
            "final": final, "best": None, "epochs_completed": 1, "stop_reason": "done", "train_count": 9,
            "val_count": 1, "classes": 10, "total_time": 1.0, "session_id": "x", "log_file": "x.log",
        })
        logged = next(m for m in messages if "Final accuracy: " in m).split("Final accuracy: ")[1]
        assert format_accuracy(accuracy) == logged
