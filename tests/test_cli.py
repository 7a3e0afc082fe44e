import csv
import json
import subprocess
import sys

import pytest

from captcha_ocr.cli import main
from captcha_ocr.config import TrainConfig
from captcha_ocr.session import train
from tests.conftest import TINY_MODEL


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--help"])
    assert raised.value.code == 0
    out = capsys.readouterr().out
    for command in ("generate", "train", "predict"):
        assert command in out


def test_train_help_documents_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--val-split", "--epochs", "--max-epochs", "--resume", "--config", "--max-time", "--device", "--ignore-case"):
        assert flag in out


def test_module_entry_point_runs():
    completed = subprocess.run([sys.executable, "-m", "captcha_ocr", "--version"], capture_output=True, text=True)
    assert completed.returncode == 0
    assert "captcha-ocr" in completed.stdout


def test_generate_is_reproducible(tmp_path, capsys):
    for name in ("a", "b"):
        code = main(["generate", str(tmp_path / name), "--count", "12", "--length", "3-5", "--charset", "digits+XY", "--seed", "7", "--no-progress"])
        assert code == 0
    first = (tmp_path / "a" / "labels.csv").read_text()
    second = (tmp_path / "b" / "labels.csv").read_text()
    assert first == second
    rows = list(csv.DictReader(first.splitlines()))
    assert len(rows) == 12
    for row in rows:
        assert 3 <= len(row["label"]) <= 5
        assert set(row["label"]) <= set("0123456789XY")
        assert row["path"].startswith(row["label"] + "_")
        assert (tmp_path / "a" / row["path"]).is_file()


def test_generate_rejects_bad_length(tmp_path, capsys):
    code = main(["generate", str(tmp_path), "--length", "6-4"])
    assert code == 2
    assert "invalid length" in capsys.readouterr().err


def test_train_bad_source_is_one_line(tmp_path, capsys):
    code = main(["train", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("captcha-ocr train: error: ")
    assert "not found" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_train_rejects_invalid_config(tmp_path, capsys):
    code = main(["train", "--val-split", "1.5", "--height", "50", "--output-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "val_split" in err
    assert "multiple of 16" in err


def test_config_file_and_flags(tmp_path, generated_folder):
    toml_file = tmp_path / "settings.toml"
    toml_file.write_text('epochs = 5\nbatch_size = 4\nlr = 0.002\n')
    yaml_file = tmp_path / "settings.yaml"
    yaml_file.write_text("epochs: 3\nchannels: [4, 4, 8, 8, 8]\n")
    from_toml = TrainConfig.build(TrainConfig.from_file(toml_file), {"epochs": 9})
    assert from_toml.epochs == 9
    assert from_toml.batch_size == 4
    assert from_toml.lr == 0.002
    from_yaml = TrainConfig.build(TrainConfig.from_file(yaml_file))
    assert from_yaml.channels == [4, 4, 8, 8, 8]
    bad = tmp_path / "bad.toml"
    bad.write_text("epochz = 3\n")
    with pytest.raises(ValueError, match="unknown settings"):
        TrainConfig.from_file(bad)


def test_predict_prints_labels(tmp_path, generated_folder, capsys):
    config = TrainConfig.build({"data": [str(generated_folder)], "output_dir": str(tmp_path), "epochs": 1, "val_split": 0.25, **TINY_MODEL})
    result = train(config, console=False, progress=False)
    assert result.status == "completed"
    images = sorted(generated_folder.glob("*.png"))[:3]
    capsys.readouterr()
    assert main(["predict", str(result.model_path), *map(str, images)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    for line, image in zip(lines, images):
        path, text, confidence = line.split("\t")
        assert path == str(image)
        assert set(text) <= set("0123456789")
        assert 0.0 <= float(confidence) <= 1.0
    assert main(["predict", "--json", str(result.model_path), str(generated_folder)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(records) == 48
    assert {"path", "text", "confidence"} <= set(records[0])


def test_predict_reports_unreadable_image(tmp_path, generated_folder, capsys):
    config = TrainConfig.build({"data": [str(generated_folder)], "output_dir": str(tmp_path), "epochs": 1, "val_split": 0.25, **TINY_MODEL})
    result = train(config, console=False, progress=False)
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    capsys.readouterr()
    code = main(["predict", str(result.model_path), str(broken)])
    captured = capsys.readouterr()
    assert code == 1
    assert "broken.png" in captured.err
    assert "not a recognised image" in captured.err


@pytest.mark.parametrize(("setting", "count", "chosen"), [(0, 936, 16), (0, 19_999, 16), (0, 20_000, 32), (8, 936, 8), (64, 50_000, 64)])
def test_batch_size_follows_the_set_size_unless_given(setting, count, chosen):
    assert TrainConfig.build({"batch_size": setting}).batch_size_for(count) == chosen


@pytest.mark.parametrize("name", ["augment_from", "fine_head_at"])
def test_non_finite_fraction_reported_once(name):
    with pytest.raises(ValueError) as raised:
        TrainConfig.build({name: float("nan")})
    assert str(raised.value).count(name) == 1


def test_negative_batch_size_is_refused(tmp_path, capsys):
    code = main(["train", "--batch-size", "-1", "--output-dir", str(tmp_path)])
    assert code == 2
    assert "batch_size must be a positive integer, or 0 to choose by the set's size; got -1" in capsys.readouterr().err


def test_auto_batch_size_logged_and_saved(tmp_path, generated_folder):
    from captcha_ocr.checkpoint import load_checkpoint

    config = TrainConfig.build({
        "data": [str(generated_folder)], "output_dir": str(tmp_path), "val_split": 0.25,
        **TINY_MODEL, "batch_size": 0, "epochs": 1,
    })
    result = train(config, console=False, progress=False)
    assert result.status == "completed", result.error
    log = result.log_file.read_text(encoding="utf-8")
    assert "  - Batch Size: auto (16 for sets under 20000 training images, else 32)" in log
    assert "Batch size: 16 per process x 1 process = 16 (the default for 36 training images)" in log
    assert load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["train_config"]["batch_size"] == 16
