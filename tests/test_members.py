"""Models of several networks (members) trained side by side and read together."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from captcha_ocr import export
from captcha_ocr.checkpoint import load_checkpoint, save_atomic
from captcha_ocr.config import ConfigError, TrainConfig
from captcha_ocr.data.generate import GenerateSettings, generate
from captcha_ocr.data.images import is_image_file, to_model_input
from captcha_ocr.data.sources import collect
from captcha_ocr.export import export_onnx
from captcha_ocr.model import CRNN, MemberSet, ModelConfig, build_model
from captcha_ocr.predict import Recognizer, combine_views, log_softmax
from captcha_ocr.session import train
from captcha_ocr.training.loop import members_training_loss, training_loss
from tests.conftest import TINY_MODEL, TrainedModel


def _config(members):
    return ModelConfig(num_classes=11, height=32, width=128, channels=(4, 4, 8, 8, 8), rnn_hidden=8, members=members)


def test_one_member_builds_a_plain_crnn():
    model = build_model(_config(1))
    assert type(model) is CRNN


def test_old_model_config_has_one_member():
    values = _config(1).to_dict()
    del values["members"]
    assert ModelConfig.from_dict(values).members == 1


def test_zero_members_refused():
    with pytest.raises(ValueError, match="members must be a whole number from 1 to 8"):
        _config(0)


def test_member_rows_follow_each_other():
    torch.manual_seed(0)
    model = build_model(_config(3)).eval()
    images = torch.rand(2, 1, 32, 128)
    with torch.inference_mode():
        logits = model(images)
        alone = [member(images) for member in model.members]
    assert logits.shape[1] == 6
    for m, member_logits in enumerate(alone):
        torch.testing.assert_close(logits[:, 2 * m : 2 * m + 2], member_logits)


def test_members_start_from_different_weights():
    torch.manual_seed(0)
    model = build_model(_config(2))
    first, second = (member.classifier.weight for member in model.members)
    assert not torch.equal(first, second)


def test_member_batches_give_each_member_its_own_images():
    torch.manual_seed(0)
    model = build_model(_config(2)).eval()
    images = torch.rand(4, 1, 32, 128)
    with torch.inference_mode():
        coarse, _ = model(images, both_heads=True, member_batches=True)
        second_alone, _ = model.members[1](images[2:], both_heads=True)
    torch.testing.assert_close(coarse[:, 2:], second_alone)


def test_each_member_gets_its_own_gradients():
    torch.manual_seed(0)
    model = build_model(_config(2)).eval()  # no dropout, so both passes draw the same
    images = torch.rand(2, 1, 32, 128)
    targets, lengths = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([3, 2])
    coarse, fine = model(images, both_heads=True)
    loss, _ = members_training_loss(coarse, fine, targets, lengths, 2, presence_weight=1.0, fine_active=False)
    loss.backward()
    together = model.members[1].classifier.weight.grad.clone()
    model.zero_grad()
    alone_coarse, alone_fine = model.members[1](images, both_heads=True)
    alone, _ = training_loss(alone_coarse, alone_fine, targets, lengths, presence_weight=1.0, fine_active=False)
    alone.backward()
    torch.testing.assert_close(together, model.members[1].classifier.weight.grad)


def test_fine_head_switches_in_every_member():
    model = build_model(_config(2))
    model.activate_fine_head()
    assert [member.fine_active for member in model.members] == [True, True]


@pytest.fixture(scope="module")
def two_member_model(generated_folder, tmp_path_factory):
    """Two epochs of a two-member model, augmenting from the first step."""
    root = tmp_path_factory.mktemp("members")
    val_dir = root / "val"
    generate(val_dir, GenerateSettings(count=12, charset="digits", seed=11), progress=False)
    config = TrainConfig.build({
        "data": [str(generated_folder)], "val": [str(val_dir)], "output_dir": str(root / "outputs"),
        "epochs": 2, **TINY_MODEL, "members": 2, "augment_from": 0.0,
    })
    result = train(config, console=False, progress=False)
    assert result.status == "completed", result.error
    return TrainedModel(result.model_path, result.run_dir, val_dir)


def test_trained_file_records_two_members(two_member_model):
    payload = load_checkpoint(two_member_model.model)
    assert payload["model_config"]["members"] == 2


def test_training_log_names_the_members(two_member_model):
    log = next((two_member_model.run_dir.parents[1] / "logs").glob("training_*.log")).read_text()
    assert "2 members trained side by side" in log


def test_recognizer_combines_the_members(two_member_model, generated_folder):
    reader = Recognizer.load(two_member_model.model, views=1)
    paths = sorted(p for p in generated_folder.iterdir() if is_image_file(p))[:6]
    pixels = np.stack([reader.pixels(p) for p in paths])
    log_probs = log_softmax(reader.backend.logits(to_model_input(pixels, reader.preprocessing)).astype(np.float64), axis=2)
    expected = combine_views(log_probs, reader.codec.decode_log_probs(log_probs, reader.label_lengths), reader.codec, 2)
    assert reader.predict_pixels(pixels) == expected


def test_logged_accuracy_is_the_recognizers(two_member_model):
    """Validation reads the members together, as Recognizer does with one view."""
    run = two_member_model.run_dir
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line][-1]
    samples = collect([two_member_model.val_dir]).samples
    reader = Recognizer.load(run / "checkpoints" / "last.pt", views=1)
    readings = reader.predict_batch([sample.path for sample in samples])
    correct = sum(sample.label == reading.text for sample, reading in zip(samples, readings, strict=True))
    assert correct / len(samples) == pytest.approx(last["val_accuracy"])


def test_onnx_export_reads_as_pytorch(two_member_model, tmp_path, generated_folder):
    out = tmp_path / "members.onnx"
    export_onnx(two_member_model.model, out)
    paths = sorted(p for p in generated_folder.iterdir() if is_image_file(p))[:8]
    from_torch = Recognizer.load(two_member_model.model, device="cpu").predict_batch(paths)
    from_onnx = Recognizer.load(out).predict_batch(paths)
    assert [p.text for p in from_onnx] == [p.text for p in from_torch]
    output = onnx.load(str(out)).graph.output[0]
    assert output.type.tensor_type.shape.dim[1].dim_param == "2_members_x_batch"


def test_member_set_is_not_a_crnn():
    assert not isinstance(build_model(_config(2)), CRNN)
    assert isinstance(build_model(_config(2)), MemberSet)


def test_members_above_limit_refused():
    with pytest.raises(ValueError, match="from 1 to 8"):
        _config(9)


def test_members_in_train_config_above_limit(generated_folder, tmp_path):
    with pytest.raises(ConfigError, match="members must be at most 8"):
        TrainConfig.build({"data": [str(generated_folder)], "output_dir": str(tmp_path), "members": 9})


def test_invalid_members_in_model_file(two_member_model, tmp_path):
    payload = load_checkpoint(two_member_model.model)
    bad = save_atomic({**payload, "model_config": {**payload["model_config"], "members": "x"}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="members must be a whole number from 1 to 8, got 'x'"):
        Recognizer.load(bad)


def test_onnx_members_metadata_must_fit_the_graph(two_member_model, tmp_path, generated_folder):
    out = tmp_path / "members.onnx"
    export_onnx(two_member_model.model, out)
    graph = onnx.load(str(out))
    metadata = {prop.key: prop.value for prop in graph.metadata_props}
    model_config = {**json.loads(metadata["model_config"]), "members": 3}
    onnx.helper.set_model_props(graph, {**metadata, "model_config": json.dumps(model_config)})
    onnx.save(graph, str(out))
    reader = Recognizer.load(out)
    image = next(p for p in generated_folder.iterdir() if is_image_file(p))
    with pytest.raises(ValueError, match="records 3 member"):
        reader.predict(image)


def test_export_check_reads_one_text_per_image(two_member_model):
    reader = Recognizer.load(two_member_model.model, views=1)
    logits = reader.backend.logits(np.zeros((3, 1, 32, 128), dtype=np.float32))
    assert len(export._readings(logits, reader.codec, reader, 2)) == 3
