"""Prediction from an exported ONNX file in a process where ``import torch`` fails."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

from captcha_ocr.data.images import is_image_file
from captcha_ocr.predict import Recognizer

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# Put first in every child script: makes any later ``import torch`` raise ImportError.
BLOCK_TORCH = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("torch was importable")
""")


def _run_without_torch(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(script)],
        capture_output=True, text=True, timeout=120,
    )


def _val_paths(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def test_cli_predict_reads_an_onnx_file_without_torch(tiny_trained_model, tiny_onnx_model):
    result = _run_without_torch(f"""
        from captcha_ocr.cli import main
        sys.exit(main(["predict", {str(tiny_onnx_model)!r}, {str(tiny_trained_model.val_dir)!r}, "--json"]))
    """)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    expected = Recognizer.load(tiny_trained_model.model, device="cpu").predict_batch(_val_paths(tiny_trained_model.val_dir))
    assert [Path(line["path"]).name for line in lines] == [p.name for p in _val_paths(tiny_trained_model.val_dir)]
    assert [line["text"] for line in lines] == [p.text for p in expected]


def test_recognizer_and_service_load_an_onnx_file_without_torch(tiny_trained_model, tiny_onnx_model):
    paths = [str(p) for p in _val_paths(tiny_trained_model.val_dir)]
    result = _run_without_torch(f"""
        import json
        from captcha_ocr import Recognizer
        from captcha_ocr.cli import build_parser
        from captcha_ocr.serve import create_app

        reader = Recognizer.load({str(tiny_onnx_model)!r})
        texts = [p.text for p in reader.predict_batch({paths!r})]
        create_app(reader)
        build_parser().parse_args(["serve", "model.onnx"])
        print(json.dumps(texts))
    """)
    assert result.returncode == 0, result.stderr
    expected = Recognizer.load(tiny_trained_model.model, device="cpu").predict_batch(paths)
    assert json.loads(result.stdout) == [p.text for p in expected]


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _with_dependencies(names: set[str]) -> set[str]:
    """``names`` and every distribution they require, recursively (extras left out)."""
    seen: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        pending += [_requirement_name(r) for r in requirements if "extra ==" not in r]
    return seen


def test_runtime_extra_covers_every_module_the_onnx_path_imports(tiny_trained_model, tiny_onnx_model):
    result = _run_without_torch(f"""
        import json
        at_start = set(sys.modules)
        from captcha_ocr.cli import main
        main(["predict", {str(tiny_onnx_model)!r}, {str(tiny_trained_model.val_dir)!r}])
        loaded = [name for name, module in sys.modules.items() if module is not None and name not in at_start]
        modules = sorted({{name.split(".")[0] for name in loaded}})
        print("MODULES " + json.dumps(modules))
    """)
    assert result.returncode == 0, result.stderr
    imported = json.loads(result.stdout.rsplit("MODULES ", 1)[1])
    extras = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    allowed = _with_dependencies({_requirement_name(r) for r in extras["runtime"]})
    owners = metadata.packages_distributions()
    outside = {
        module: owners[module] for module in imported
        if module in owners and module not in sys.stdlib_module_names and module != "captcha_ocr"
        and not {d.lower().replace("_", "-") for d in owners[module]} & allowed
    }
    assert "onnxruntime" in imported and "torch" not in imported
    assert outside == {}, f"imported on the ONNX path but missing from the runtime extra: {outside}"
