import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captcha_ocr.data.images import ImageError, Preprocessing, load_image
from captcha_ocr.data.sources import DEFAULT_LABEL_PATTERN, SourceError, collect, label_from_name
from tests.conftest import CASES, require

DEFAULT = re.compile(DEFAULT_LABEL_PATTERN)


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("226md.png", "226md"),
        ("ab12_9f3e0c.jpg", "ab12"),
        ("0000.1.png", "0000"),
        ("x7-copy.png", "x7"),
        ("Zz9.webp", "Zz9"),
    ],
)
def test_default_label_rule(name, label):
    assert label_from_name(Path(name), DEFAULT) == label


def test_custom_label_pattern_uses_first_group():
    pattern = re.compile(r"^\d+-(\w+)$")
    assert label_from_name(Path("0001-abc.png"), pattern) == "abc"
    assert label_from_name(Path("nomatch.png"), pattern) is None


def test_folder_labels_and_ignore_case(tmp_path):
    for name in ("AbC_1.png", "xyz.png"):
        Image.new("L", (20, 10), 255).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    collected = collect([tmp_path], ignore_case=True)
    assert sorted(s.label for s in collected.samples) == ["abc", "xyz"]
    assert [p.name for p, _ in collected.skipped] == ["notes.txt"]


def test_whitespace_file_name_label_skipped(tmp_path):
    for name in (" _1.png", "ab12.png"):
        Image.new("L", (20, 10), 255).save(tmp_path / name)
    collected = collect([tmp_path])
    assert [s.label for s in collected.samples] == ["ab12"]
    assert [(p.name, reason) for p, reason in collected.skipped] == [
        (" _1.png", "empty label: the file name's label is only whitespace"),
    ]


def test_windows_manifest_resolves_paths():
    manifest = require(CASES / "manifest_windows_paths.csv")
    collected = collect([manifest])
    assert collected.skipped == []
    assert len(collected.samples) >= 4
    for sample in collected.samples:
        assert sample.path.is_file()
        assert "\\" not in sample.label
        assert "\\" not in str(sample.path)
    labels = {s.label for s in collected.samples}
    assert {"6666", "aabb", "5bbzt", "0000"} <= labels


def test_tab_manifest_detects_columns():
    manifest = require(CASES / "manifest_tab_separated.tsv")
    collected = collect([manifest])
    assert collected.skipped == []
    by_label = {s.label: s.path for s in collected.samples}
    assert by_label["xxxxx"].name == "xxxxx.png"
    assert by_label["k9"].name == "k9.png"


def test_manifest_named_columns(tmp_path):
    Image.new("L", (20, 10), 255).save(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_file,answer_text\na.png,q1\n")
    with pytest.raises(SourceError, match="--path-column"):
        collect([manifest])
    collected = collect([manifest], path_column="image_file", label_column="answer_text")
    assert [s.label for s in collected.samples] == ["q1"]


def test_manifest_missing_file_is_skipped(tmp_path):
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\nmissing.png,abc\n")
    collected = collect([manifest])
    assert collected.samples == []
    assert "not found" in collected.skipped[0][1]


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        collect([tmp_path / "nope"])


def test_several_sources_at_once(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    Image.new("L", (20, 10), 255).save(first / "11.png")
    Image.new("L", (20, 10), 255).save(second / "22.png")
    collected = collect([first, second])
    assert [s.label for s in collected.samples] == ["11", "22"]


def test_transparent_palette_flattens_onto_white():
    folder = require(CASES / "transparent_palette")
    collected = collect([folder])
    assert sorted(s.label for s in collected.samples) == ["0000", "0000", "0005", "0009"]
    preprocessing = Preprocessing(height=32, width=96)
    for sample in collected.samples:
        with Image.open(sample.path) as image:
            assert image.mode == "P"
        pixels = load_image(sample.path, preprocessing)
        # The transparent background must come out white, and the digits dark.
        corners = [pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]]
        assert min(corners) > 200, sample.path
        assert pixels.min() < 100, sample.path


def test_rgba_transparency_is_white(tmp_path):
    image = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    image.paste((0, 0, 0, 255), (10, 5, 20, 15))
    image.save(tmp_path / "t.png")
    pixels = load_image(tmp_path / "t.png", Preprocessing(height=16, width=40))
    assert pixels[0, 0] == 255
    assert pixels[8, 15] < 30


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".gif", ".bmp", ".webp"])
def test_formats_load(tmp_path, suffix):
    image = Image.new("RGB", (60, 20), (255, 255, 255))
    image.paste((0, 0, 0), (10, 5, 30, 15))
    path = tmp_path / f"ab{suffix}"
    image.save(path)
    pixels = load_image(path, Preprocessing(height=16, width=48))
    assert pixels.shape == (16, 48)
    assert pixels.dtype == np.uint8
    assert pixels.max() > 200
    assert pixels.min() < 60


def test_mixed_lengths_collect_and_load():
    folder = require(CASES / "mixed_lengths")
    collected = collect([folder])
    lengths = {len(s.label) for s in collected.samples}
    assert min(lengths) == 2
    assert max(lengths) == 8
    preprocessing = Preprocessing(height=48, width=160)
    shapes = {load_image(s.path, preprocessing).shape for s in collected.samples}
    assert shapes == {(48, 160)}


def test_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (3000, 3000), 255).save(path)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(path, Preprocessing(height=16, width=32, max_pixels=1_000_000))


def test_empty_and_garbage_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.png"
    garbage.write_text("hello")
    with pytest.raises(ImageError, match="empty"):
        load_image(empty, Preprocessing())
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(garbage, Preprocessing())
