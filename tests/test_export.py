"""ONNX export: the graph's interface, its metadata, and the check against PyTorch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from captcha_ocr import export
from captcha_ocr.checkpoint import load_checkpoint
from captcha_ocr.cli import build_parser, main
from captcha_ocr.data.images import Preprocessing, is_image_file, to_model_input
from captcha_ocr.export import VerificationError, export_onnx
from captcha_ocr.model import output_steps
from captcha_ocr.predict import Recognizer


def _val_images(folder):
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def test_onnx_matches_pytorch_on_validation_images(tiny_trained_model, tiny_onnx_model):
    torch_reader = Recognizer.load(tiny_trained_model.model, device="cpu")
    onnx_reader = Recognizer.load(tiny_onnx_model)
    paths = _val_images(tiny_trained_model.val_dir)
    assert len(paths) == 12
    pixels = np.stack([onnx_reader.pixels(path) for path in paths])
    inputs = to_model_input(pixels, onnx_reader.preprocessing)
    expected = torch_reader.backend.logits(inputs)
    actual = onnx_reader.backend.logits(inputs)
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() < 1e-4
    assert [p.text for p in onnx_reader.predict_batch(paths)] == [p.text for p in torch_reader.predict_batch(paths)]
    confidences = zip(onnx_reader.predict_batch(paths), torch_reader.predict_batch(paths), strict=True)
    assert all(a.confidence == pytest.approx(b.confidence, abs=1e-5) for a, b in confidences)


def test_graph_input_output_and_batch_axis(tiny_trained_model, tiny_onnx_model):
    graph = onnx.load(str(tiny_onnx_model)).graph
    payload = load_checkpoint(tiny_trained_model.model)
    height, width = payload["preprocessing"]["height"], payload["preprocessing"]["width"]
    (images,), (logits,) = graph.input, graph.output
    assert (images.name, logits.name) == ("images", "logits")
    assert images.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = images.type.tensor_type.shape.dim
    assert in_dims[0].dim_param
    assert not in_dims[0].dim_value
    assert [d.dim_value for d in in_dims[1:]] == [1, height, width]
    out_dims = logits.type.tensor_type.shape.dim
    assert out_dims[1].dim_param
    assert not out_dims[1].dim_value

    reader = Recognizer.load(tiny_onnx_model)
    for batch in (1, 5):
        result = reader.backend.logits(np.zeros((batch, 1, height, width), dtype=np.float32))
        assert result.shape == (output_steps(width), batch, len(payload["alphabet"]) + 1)


def test_metadata_is_json_for_prediction(tiny_trained_model, tiny_onnx_model):
    props = {p.key: json.loads(p.value) for p in onnx.load(str(tiny_onnx_model)).metadata_props}
    payload = load_checkpoint(tiny_trained_model.model)
    assert props["format"] == "captcha-ocr-onnx"
    assert props["format_version"] == export.ONNX_FORMAT_VERSION
    assert props["alphabet"] == payload["alphabet"]
    assert props["preprocessing"] == Preprocessing.from_dict(payload["preprocessing"]).to_dict()
    assert props["model_config"] == payload["model_config"]
    assert props["ignore_case"] is False
    assert props["label_lengths"] == payload["label_lengths"] == [4]
    assert props["session_id"] == payload["session_id"] == tiny_trained_model.run_dir.name
    assert props["metrics"]["epoch"] == payload["epoch"]
    assert Recognizer.load(tiny_onnx_model).metadata["format"] == "captcha-ocr-onnx"


@pytest.mark.parametrize("value", ['"five"', "5", "[0]", "[-1]", "[4.5]", "[true]", '{"4": 1}', '["4"]'])
def test_invalid_label_lengths_metadata_rejected(tiny_onnx_model, tmp_path, capsys, value):
    graph = onnx.load(str(tiny_onnx_model))
    for prop in graph.metadata_props:
        if prop.key == "label_lengths":
            prop.value = value
    broken = tmp_path / "broken.onnx"
    onnx.save(graph, str(broken))
    with pytest.raises(ValueError, match="invalid label_lengths"):
        Recognizer.load(broken)
    assert main(["predict", str(broken), str(tmp_path)]) == 2
    assert "invalid label_lengths" in capsys.readouterr().err


def test_null_lengths_metadata_reads_any(tiny_onnx_model, tmp_path):
    graph = onnx.load(str(tiny_onnx_model))
    for prop in graph.metadata_props:
        if prop.key == "label_lengths":
            prop.value = "null"
    unconstrained = tmp_path / "any.onnx"
    onnx.save(graph, str(unconstrained))
    assert Recognizer.load(unconstrained).label_lengths is None


def test_cli_export_prints_the_check(tiny_trained_model, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    code = main(["export", str(tiny_trained_model.model), "--out", str(out), "--verify-data", str(tiny_trained_model.val_dir)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert out.is_file()
    assert "Checked 12 images and 10 random inputs" in printed
    assert "texts equal: yes" in printed
    assert f"Wrote {out}" in printed


def test_checkpoint_export_checks_run_images(tiny_trained_model, tmp_path):
    result = export_onnx(tiny_trained_model.run_dir / "checkpoints" / "best.pt", tmp_path / "best.onnx")
    # The run's validation folder (12) comes first, then its 48 training images.
    assert result.report.images == 60
    assert any(source.startswith("60 images of run") for source in result.report.sources)
    assert result.report.passed
    assert json.loads(result.metadata["exported_from"]) == "best.pt"


def test_export_without_run_folder_uses_synthetic(tiny_trained_model, tmp_path):
    lonely = tmp_path / "lonely.pth"
    shutil.copy(tiny_trained_model.model, lonely)
    result = export_onnx(lonely, tmp_path / "lonely.onnx")
    assert result.report.images == export.SYNTHETIC_CAPTCHAS
    assert f"{export.SYNTHETIC_CAPTCHAS} synthetic CAPTCHAs" in result.report.sources
    assert 1 in result.report.batch_sizes
    assert max(result.report.batch_sizes) > 1


def test_export_mismatch_fails_and_writes_nothing(tiny_trained_model, tmp_path, monkeypatch, capsys):
    write_graph = export._write_graph

    def export_a_different_model(model, path, opset, exporter):
        tampered = type(model)(model.config)
        tampered.load_state_dict(model.state_dict())
        with torch.no_grad():
            tampered.classifier.bias += torch.linspace(0, 5, tampered.classifier.bias.numel())
        return write_graph(tampered.eval(), path, opset, exporter)

    monkeypatch.setattr(export, "_write_graph", export_a_different_model)
    out = tmp_path / "bad.onnx"
    code = main(["export", str(tiny_trained_model.model), "--out", str(out)])
    error = capsys.readouterr().err
    assert code == 1
    assert "verification failed" in error
    assert "max abs logit difference" in error
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(VerificationError, match="was not written"):
        export_onnx(tiny_trained_model.model, out)


def test_export_rejects_non_checkpoint(tmp_path, capsys):
    fake = tmp_path / "fake.pth"
    fake.write_bytes(b"not a checkpoint")
    assert main(["export", str(fake)]) == 2
    assert "fake.pth" in capsys.readouterr().err
    assert not (tmp_path / "fake.onnx").exists()


def test_empty_verify_data_is_error(tiny_trained_model, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(tiny_trained_model.model), "--out", str(tmp_path / "m.onnx"), "--verify-data", str(empty)]) == 2
    assert "no readable images" in capsys.readouterr().err


def test_export_cli_defaults_match_library():
    args = build_parser().parse_args(["export", "model.pth"])
    assert (args.opset, args.tolerance, args.verify_limit, args.exporter) == (
        export.DEFAULT_OPSET, export.DEFAULT_TOLERANCE, export.DEFAULT_VERIFY_LIMIT, "auto",
    )



def test_fine_head_model_exports_its_output(tiny_trained_model, tmp_path):
    from captcha_ocr.checkpoint import save_atomic
    from captcha_ocr.model import CRNN, ModelConfig

    payload = load_checkpoint(tiny_trained_model.model)
    model = CRNN(ModelConfig.from_dict(payload["model_config"]))
    model.load_state_dict(payload["model_state"])
    model.activate_fine_head()
    # Move the fine head away from the coarse copy, so the check can tell the heads apart.
    with torch.no_grad():
        model.fine_classifier.bias.add_(torch.linspace(-1.0, 1.0, model.fine_classifier.bias.numel()))
    fine_path = save_atomic({**payload, "model_state": model.state_dict()}, tmp_path / "fine.pth")
    out = tmp_path / "fine.onnx"
    export_onnx(fine_path, out)

    torch_reader = Recognizer.load(fine_path, device="cpu")
    onnx_reader = Recognizer.load(out)
    paths = _val_images(tiny_trained_model.val_dir)
    inputs = to_model_input(np.stack([onnx_reader.pixels(path) for path in paths]), onnx_reader.preprocessing)
    expected = torch_reader.backend.logits(inputs)
    model.eval()
    with torch.inference_mode():
        _, fine = model(torch.from_numpy(inputs), both_heads=True)
    assert np.abs(expected - fine.numpy()).max() < 1e-5
    assert np.abs(onnx_reader.backend.logits(inputs) - expected).max() < 1e-4
