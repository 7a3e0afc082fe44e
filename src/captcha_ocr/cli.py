"""The ``captcha-ocr`` command line: parses arguments and calls the package's modules."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from captcha_ocr import __version__
from captcha_ocr.commands import ANY_LENGTH_HELP, VIEWS_HELP, views_count

DESCRIPTION = "Train, evaluate, export and serve CAPTCHA recognizers (CNN + BiLSTM + CTC)."


class CommandError(Exception):
    """A user error reported as one line on stderr with exit code 2."""


def _flag_type(annotation: str) -> tuple[Any, dict[str, Any]]:
    """Map a TrainConfig annotation (a string under postponed evaluation) to argparse settings."""
    base = annotation.replace(" | None", "")
    if base == "bool":
        return None, {"action": argparse.BooleanOptionalAction}
    if base == "int":
        return int, {}
    if base == "float":
        return float, {}
    if base == "list[int]":
        return int, {"nargs": "+"}
    if base == "list[str]":
        return str, {"nargs": "+"}
    return str, {}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from captcha_ocr.config import TrainConfig

    parser.add_argument("data", nargs="*", metavar="DATA", help="image folders or CSV/TSV manifests; none: a generated set")
    parser.add_argument("--config", metavar="FILE", help="read settings from a TOML or YAML file; flags override it")
    parser.add_argument("--resume", metavar="ID_OR_PATH", help="continue a run: run ID, unique prefix, 'latest', run folder or checkpoint file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    defaults = TrainConfig.field_defaults()
    for spec in dataclasses.fields(TrainConfig):
        if spec.metadata.get("cli") is False:
            continue
        kind, extra = _flag_type(spec.type)
        names = ["--" + spec.name.replace("_", "-")]
        if spec.name == "epochs":
            names.append("--max-epochs")
        default = defaults[spec.name]
        help_text = spec.metadata["help"] + (f" (default: {default})" if default not in (None, [], "") else "")
        kwargs: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS, "help": help_text, **extra}
        if kind is not None:
            kwargs["type"] = kind
        if "choices" in spec.metadata:
            kwargs["choices"] = spec.metadata["choices"]
        parser.add_argument(*names, **kwargs)


def cmd_train(args: argparse.Namespace) -> int:
    from captcha_ocr.config import TrainConfig
    from captcha_ocr.session import train

    explicit = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    if args.data:
        explicit["data"] = list(args.data)
    else:
        explicit.pop("data", None)
    file_values = TrainConfig.from_file(args.config) if args.config else {}
    config = TrainConfig.build(file_values, explicit)
    if not config.data and not args.resume and "epochs" not in explicit and "epochs" not in file_values:
        # The built-in demonstration stops sooner than training on real data would.
        config = TrainConfig.build(config.to_dict(), {"epochs": config.synthetic_epochs})
    result = train(
        config, resume=args.resume, overrides=explicit, argv=sys.argv,
        progress=False if args.no_progress else None,
    )
    if result.status == "failed" and result.exit_code == 2:
        print(f"captcha-ocr train: error: {result.error}", file=sys.stderr)
    return result.exit_code


def cmd_generate(args: argparse.Namespace) -> int:
    from captcha_ocr.config import parse_length_range
    from captcha_ocr.data.generate import GenerateSettings, generate

    low, high = parse_length_range(args.length)
    if not args.out_dir.strip():
        raise CommandError("OUT_DIR is empty; give the folder to write the images to")
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise CommandError(f"{args.out_dir} exists and is not a folder")
    settings = GenerateSettings(
        count=args.count, min_length=low, max_length=high, charset=args.charset,
        width=args.width, height=args.height, seed=args.seed,
    )
    manifest = generate(Path(args.out_dir), settings, progress=not args.no_progress and sys.stderr.isatty())
    print(f"Wrote {args.count} images and {manifest}")
    return 0


def _expand_images(inputs: list[str]) -> list[Path]:
    from captcha_ocr.data.images import is_image_file

    paths: list[Path] = []
    for item in inputs:
        if not item.strip():
            raise CommandError("an image path is empty; give image files or folders")
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p)))
        elif path.is_file():
            paths.append(path)
        else:
            raise CommandError(f"{path}: image or folder not found")
    return paths


def cmd_predict(args: argparse.Namespace) -> int:
    from captcha_ocr.data.images import ImageError
    from captcha_ocr.predict import Recognizer

    if args.batch_size <= 0:
        raise CommandError(f"--batch-size must be positive, got {args.batch_size}")
    recognizer = Recognizer.load(args.model, device=args.device, any_length=args.any_length, views=args.views)
    paths = _expand_images(args.images)
    if not paths:
        raise CommandError(f"no images found in {', '.join(args.images)}")
    failures = 0
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        decoded, readable = [], []
        for path in chunk:
            try:
                decoded.append(recognizer.pixels(path))
                readable.append(path)
            except (ImageError, OSError) as error:
                failures += 1
                _print_prediction(args, path, None, None, str(error))
        if not decoded:
            continue
        import numpy as np

        for path, prediction in zip(readable, recognizer.predict_pixels(np.stack(decoded))):
            _print_prediction(args, path, prediction.text, prediction.confidence, None)
    return 1 if failures and failures == len(paths) else 0


def _print_prediction(args: argparse.Namespace, path: Path, text: str | None, confidence: float | None, error: str | None) -> None:
    if args.json:
        record: dict[str, Any] = {"path": str(path), "text": text, "confidence": confidence}
        if error:
            record["error"] = error
        print(json.dumps(record, ensure_ascii=False), flush=True)
    elif error:
        print(f"{path}\tERROR\t{error}", flush=True)
        print(f"captcha-ocr predict: {path}: {error}", file=sys.stderr)
    else:
        print(f"{path}\t{text}\t{confidence:.4f}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captcha-ocr", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    generate = commands.add_parser("generate", help="write synthetic labelled CAPTCHAs", description="Write synthetic CAPTCHA images named <label>_<index>.png plus a labels.csv manifest.")
    generate.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the images to")
    generate.add_argument("--count", type=int, default=1000, help="number of images (default: 1000)")
    generate.add_argument("--length", default="4", help="label length, such as 4, or a range such as 4-6 (default: 4)")
    generate.add_argument("--charset", default="digits", help="named sets (digits, lower, upper, alpha, alnum, alnum_lower, alnum_upper, hex) and literal characters joined with + (default: digits)")
    generate.add_argument("--width", type=int, default=160, help="image width in pixels (default: 160)")
    generate.add_argument("--height", type=int, default=60, help="image height in pixels (default: 60)")
    generate.add_argument("--seed", type=int, default=0, help="seed for the labels; the noise differs per run (default: 0)")
    generate.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    generate.set_defaults(handler=cmd_generate)

    train = commands.add_parser("train", help="train a recognizer and write the training log", description="Train a CNN + BiLSTM + CTC recognizer. The log goes to outputs/logs/training_<ID>.log, the run record to outputs/runs/<ID>/ and the model to outputs/models/.")
    add_train_arguments(train)
    train.set_defaults(handler=cmd_train)

    predict = commands.add_parser("predict", help="read images with a trained model", description="Print one line per image: path, text and confidence (tab-separated), or JSON lines with --json.")
    predict.add_argument("model", metavar="MODEL", help="a .pth model or checkpoint, or an exported .onnx file")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders (searched recursively)")
    predict.add_argument("--json", action="store_true", help="print one JSON object per image")
    predict.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    predict.add_argument("--device", default=None, help="cpu, cuda or cuda:N for .pth models (default: cuda when available)")
    predict.add_argument("--any-length", action="store_true", help=ANY_LENGTH_HELP)
    predict.add_argument("--views", type=views_count, default=3, metavar="N", help=VIEWS_HELP)
    predict.set_defaults(handler=cmd_predict)

    for register in _optional_commands():
        register(commands)
    return parser


def _optional_commands() -> list[Any]:
    """Subcommands defined in their own modules, registered in this order."""
    from captcha_ocr import commands

    return commands.REGISTRARS


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The package's input errors (ConfigError, CheckpointError, DataError, SourceError,
    # ImageError) all derive from ValueError; naming them here would import PyTorch
    # through checkpoint.py, which predicting with an ONNX file must not need.
    try:
        return args.handler(args)
    except (CommandError, FileNotFoundError, ValueError) as error:
        # Under torchrun every rank meets the same input error; one of them reports it.
        if os.environ.get("RANK", "0") == "0":
            print(f"captcha-ocr {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError) as error:
        print(f"captcha-ocr {args.command}: error: {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"captcha-ocr {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (``captcha-ocr predict ... | head``).
        # Point stdout at /dev/null so the interpreter's final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
