"""captcha-ocr evaluate: scoring by hand, the held-out split as training made it, skipped files, reports."""

import json
import re
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captcha_ocr.cli import main
from captcha_ocr.config import TrainConfig
from captcha_ocr.data.dataset import DecodedSet
from captcha_ocr.evaluate import (
    EvaluationSettings,
    evaluate,
    file_list_hash,
    resolve_settings,
    score,
)
from captcha_ocr.predict import Recognizer
from captcha_ocr.record.log import new_log_id
from captcha_ocr.session import train
from tests.conftest import TINY_MODEL

LINE = re.compile(r"^\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\] \[(INFO|WARNING|ERROR)\] ")


# ------------------------------------------------------------------ by hand
def test_score_by_hand():
    labels = ["1234", "1234", "567", "89"]
    predictions = ["1234", "1284", "567", "8"]
    confidences = [0.9, 0.4, 0.8, 0.2]
    results = score(labels, predictions, confidences, ["a.png", "b.png", "c.png", "d.png"], worst=1)

    assert (results["count"], results["correct"]) == (4, 2)
    assert results["accuracy"] == 0.5
    assert (results["character_errors"], results["characters"]) == (2, 13)
    assert results["cer"] == pytest.approx(2 / 13)
    assert results["by_length"] == {
        "2": {"count": 1, "correct": 0, "accuracy": 0.0},
        "3": {"count": 1, "correct": 1, "accuracy": 1.0},
        "4": {"count": 2, "correct": 1, "accuracy": 0.5},
    }
    assert results["confusions"] == [
        {"true": "3", "predicted": "8", "count": 1},
        {"true": "9", "predicted": "", "count": 1},
    ]
    assert results["mean_confidence_correct"] == pytest.approx(0.85)
    assert results["mean_confidence_wrong"] == pytest.approx(0.3)
    # Both mistakes are one edit away; the less confident one is worse.
    assert [m["path"] for m in results["mistakes"]] == ["d.png", "b.png"]
    assert [m["path"] for m in results["worst_mistakes"]] == ["d.png"]


def test_worst_mistakes_order():
    results = score(["abcd", "abcd", "abcd"], ["abcx", "", "abcd"], [0.1, 0.9, 0.5])
    assert [(m["index"], m["edit_distance"]) for m in results["mistakes"]] == [(1, 4), (0, 1)]
    assert results["mean_confidence_correct"] == 0.5
    assert score(["ab"], ["ab"], [1.0])["mean_confidence_wrong"] is None


def test_file_list_hash_matches_dataset():
    paths = [Path("b/2.png"), Path("a/1.png"), Path("c/3.png")]
    decoded = DecodedSet(np.zeros((3, 2, 2), dtype=np.uint8), ["x", "y", "z"], paths)
    assert file_list_hash(paths) == decoded.file_list_hash()
    assert file_list_hash(paths[:2]) != decoded.file_list_hash()


def test_settings_default_to_training():
    resolved = resolve_settings(EvaluationSettings(), {"ignore_case": True}, {})
    assert resolved.ignore_case is True
    assert resolved.seed == 42
    training = {"ignore_case": True, "seed": 7, "label_pattern": "^(\\d+)", "charset": "digits"}
    resolved = resolve_settings(EvaluationSettings(), {}, training)
    assert (resolved.ignore_case, resolved.seed, resolved.label_pattern) == (True, 7, "^(\\d+)")
    assert resolved.explicit_charset is True
    # The model file's own flag wins over its run folder's.
    assert resolve_settings(EvaluationSettings(), {"ignore_case": False}, training).ignore_case is False
    given = EvaluationSettings(ignore_case=True, seed=1, label_pattern="^(.+)")
    resolved = resolve_settings(given, {"ignore_case": False}, training)
    assert (resolved.ignore_case, resolved.seed, resolved.label_pattern) == (True, 1, "^(.+)")


def test_new_log_id_is_exclusive(tmp_path):
    moment = datetime(2024, 3, 16, 14, 30, 22)
    first = new_log_id(tmp_path, "evaluation", now=moment)
    second = new_log_id(tmp_path, "evaluation", now=moment)
    assert (first, second) == ("20240316_143022", "20240316_143022_2")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "evaluation_20240316_143022.log", "evaluation_20240316_143022_2.log",
    ]


# ------------------------------------------------------------- a real model
@pytest.fixture(scope="module")
def trained(generated_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("evaluate")
    config = TrainConfig.build(
        {"data": [str(generated_folder)], "output_dir": str(output), "epochs": 2, "val_split": 0.25,
         "lr": 0.003, **TINY_MODEL}
    )
    result = train(config, console=False, progress=False)
    assert result.status == "completed", result.error
    return result, output


def _evaluate_cli(capsys, *args):
    code = main(["evaluate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _report_path(out: str) -> Path:
    return Path(re.search(r"Report saved to: (.+)", out).group(1))


@pytest.mark.slow
def test_held_out_accuracy_matches_training_log(trained, generated_folder, capsys):
    result, output = trained
    last = result.run_dir / "checkpoints" / "last.pt"
    code, out, _ = _evaluate_cli(capsys, last, generated_folder, "--val-split", "0.25", "--seed", "42", "--output-dir", output)
    assert code == 0

    report = json.loads(_report_path(out).read_text(encoding="utf-8"))
    final = result.final
    assert report["results"]["count"] == final["val_count"] == 12
    assert report["results"]["accuracy"] == pytest.approx(final["val_accuracy"], abs=1e-12)
    assert report["results"]["cer"] == pytest.approx(final["val_cer"], abs=1e-12)
    data = json.loads((result.run_dir / "data.json").read_text(encoding="utf-8"))
    assert report["data"]["file_list_sha256"] == data["val"]["file_list_sha256"]
    assert report["reference"]["same_files_as_validation"] is True

    # The printed accuracy is the one the training log gives for the last epoch.
    log = result.log_file.read_text(encoding="utf-8")
    logged = re.findall(r"Epoch 2/2 - .*Accuracy: (\d\.\d{4} \(\d+\.\d%\))", log)
    assert logged
    assert f"Accuracy: {logged[0]}," in out
    assert "same files as its validation set" in out


@pytest.mark.slow
def test_model_file_scores_its_best_epoch(trained, generated_folder, capsys):
    result, output = trained
    code, out, _ = _evaluate_cli(capsys, result.model_path, generated_folder, "--val-split", "0.25", "--output-dir", output)
    assert code == 0
    report = json.loads(_report_path(out).read_text(encoding="utf-8"))
    assert report["model"]["epoch"] == result.best["epoch"]
    assert report["results"]["accuracy"] == pytest.approx(result.best["val_accuracy"], abs=1e-12)
    assert report["settings"]["seed"] == 42  # taken from the training run


@pytest.mark.slow
def test_reading_lengths_reported_and_lifted(trained, generated_folder, capsys):
    result, output = trained
    code, out, _ = _evaluate_cli(capsys, result.model_path, generated_folder, "--output-dir", output)
    assert code == 0
    assert "Reading lengths: 4 characters" in out
    report = json.loads(_report_path(out).read_text(encoding="utf-8"))
    assert report["model"]["label_lengths"] == [4]
    assert all(len(p["prediction"]) == 4 for p in report["predictions"])

    code, out, _ = _evaluate_cli(capsys, result.model_path, generated_folder, "--output-dir", output, "--any-length")
    assert code == 0
    assert "Reading lengths: any" in out
    report = json.loads(_report_path(out).read_text(encoding="utf-8"))
    assert report["model"]["label_lengths"] is None
    assert report["settings"]["any_length"] is True


@pytest.mark.slow
def test_labels_of_unread_lengths_reported(trained, tmp_path, capsys):
    from captcha_ocr.data.generate import GenerateSettings, generate

    result, output = trained
    folder = tmp_path / "lengths"
    generate(folder, GenerateSettings(count=6, min_length=3, max_length=6, charset="digits", seed=5), progress=False)
    code, out, _ = _evaluate_cli(capsys, result.model_path, folder, "--output-dir", output)
    assert code == 0
    report = json.loads(_report_path(out).read_text(encoding="utf-8"))
    expected = sorted({len(p["label"]) for p in report["predictions"]} - {4})
    assert expected
    assert report["data"]["unread_lengths"] == expected
    assert f"Labels of lengths the model does not read: {', '.join(map(str, expected))} characters" in out


@pytest.mark.slow
def test_other_seed_reports_other_files(trained, generated_folder, capsys):
    result, output = trained
    code, out, _ = _evaluate_cli(capsys, result.model_path, generated_folder, "--val-split", "0.25", "--seed", "7", "--output-dir", output)
    assert code == 0
    report = json.loads(_report_path(out).read_text(encoding="utf-8"))
    assert report["reference"]["same_files_as_validation"] is False
    assert "differ from its validation set" in out
    assert f"give DATA as it was given to train ({generated_folder.resolve()}" in out
    assert "with --val-split 0.25 --seed 42)" in out


@pytest.mark.slow
def test_whole_folder_report_files(trained, generated_folder, tmp_path, capsys):
    result, output = trained
    sheet = tmp_path / "misread.png"
    report_file = tmp_path / "report.json"
    code, out, _ = _evaluate_cli(
        capsys, result.model_path, generated_folder, "--output-dir", output,
        "--json", report_file, "--sheet", sheet, "--worst", "3",
    )
    assert code == 0
    report = json.loads(report_file.read_text(encoding="utf-8"))
    results = report["results"]
    assert results["count"] == 48
    assert report["data"]["held_out"] is None
    assert results["correct"] == sum(p["label"] == p["prediction"] for p in report["predictions"])
    assert sum(row["count"] for row in results["by_length"].values()) == 48
    assert len(results["worst_mistakes"]) == min(3, 48 - results["correct"])
    assert results["images_per_second"] > 0
    for phrase in ("Accuracy: ", "Character error rate: ", "Accuracy by label length:", "Mean confidence: ", "Speed: "):
        assert phrase in out

    log_file = Path(report["log_file"])
    assert re.fullmatch(r"evaluation_\d{8}_\d{6}(_\d+)?\.log", log_file.name)
    lines = log_file.read_text(encoding="utf-8").splitlines()
    assert all(LINE.match(line) for line in lines)
    assert any(line.endswith(f"Accuracy: {results['accuracy']:.4f} ({results['accuracy'] * 100:.1f}%), "
                             f"{results['correct']} of 48 labels read exactly") for line in lines)

    if results["correct"] < 48:
        with Image.open(sheet) as image:
            assert image.format == "PNG"
            assert image.width > 100
            assert image.height > 50


@pytest.mark.slow
def test_unreadable_files_warn_once_each(trained, generated_folder, tmp_path, capsys):
    result, output = trained
    folder = tmp_path / "mixed"
    folder.mkdir()
    for image in sorted(generated_folder.glob("*.png"))[:5]:
        shutil.copy(image, folder / image.name)
    (folder / "1111_empty.png").write_bytes(b"")
    (folder / "2222_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, out, err = _evaluate_cli(capsys, result.model_path, folder, "--output-dir", output)
    assert code == 0
    report = json.loads(_report_path(out).read_text(encoding="utf-8"))
    assert report["results"]["count"] == 5
    assert report["data"]["skipped"] == 2
    assert sorted(Path(s["path"]).name for s in report["data"]["skipped_files"]) == ["1111_empty.png", "2222_broken.png"]
    assert err.count("[WARNING] Skipped ") == 2
    log = Path(report["log_file"]).read_text(encoding="utf-8")
    assert log.count("[WARNING] Skipped ") == 2


@pytest.mark.slow
def test_case_folds_like_training(trained, generated_folder, tmp_path):
    result, output = trained
    images = sorted(generated_folder.glob("*.png"))[:4]
    manifest = tmp_path / "upper.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},AB{i}\n" for i, p in enumerate(images)), encoding="utf-8")
    recognizer = Recognizer.load(result.model_path, device="cpu")

    recognizer.metadata["ignore_case"] = True
    folded, _ = evaluate(recognizer, [manifest], EvaluationSettings(), result.model_path, output)
    assert [p["label"] for p in folded["predictions"]] == ["ab0", "ab1", "ab2", "ab3"]
    assert folded["data"]["unknown_characters"] == "ab"

    exact, _ = evaluate(recognizer, [manifest], EvaluationSettings(ignore_case=False), result.model_path, output)
    assert [p["label"] for p in exact["predictions"]] == ["AB0", "AB1", "AB2", "AB3"]


@pytest.mark.slow
def test_no_usable_image_fails(trained, tmp_path, capsys):
    result, output = trained
    (tmp_path / "1234.png").write_bytes(b"")
    code, _, err = _evaluate_cli(capsys, result.model_path, tmp_path, "--output-dir", output)
    assert code == 2
    assert "no usable images" in err


@pytest.mark.slow
def test_invalid_split_fraction_rejected(trained, generated_folder, capsys):
    result, output = trained
    code, _, err = _evaluate_cli(capsys, result.model_path, generated_folder, "--val-split", "1.5", "--output-dir", output)
    assert code == 2
    assert "--val-split must be between 0 and 1" in err
