"""Registration of the subcommands that live beside their own modules.

Each registrar adds one subparser to the ``captcha-ocr`` command and sets its
handler; the heavy imports happen inside the handlers, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any

REGISTRARS: list = []

ANY_LENGTH_HELP = (
    "read any number of characters (by default, a model trained with --keep-lengths reads only "
    "the label lengths of its training set)"
)
VIEWS_HELP = (
    "read each image this many times (1 to 15), shifted 3 pixels apart sideways, and keep the text the "
    "readings together find most probable; 1 reads each image once, 1.4 to 3 times as fast (default: 3)"
)


def views_count(text: str) -> int:
    """Parse --views: a whole number from 1 to MAX_VIEWS."""
    from captcha_ocr.predict import MAX_VIEWS

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_VIEWS}, got {text!r}") from None
    if not 1 <= value <= MAX_VIEWS:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_VIEWS}, got {value}")
    return value


# --------------------------------------------------------------------- evaluate
def register_evaluate(commands: Any) -> None:
    parser = commands.add_parser(
        "evaluate", help="score a model on labelled images",
        description=(
            "Read labelled images with a model and report whole-label accuracy, character error rate, "
            "accuracy per label length, the most confused characters, confidence, speed and the worst "
            "mistakes. The report is printed, logged to OUTPUT_DIR/logs/evaluation_<ID>.log and saved as JSON."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="a .pth model or checkpoint, or an exported .onnx file")
    parser.add_argument("data", nargs="+", metavar="DATA", help="image folders or CSV/TSV manifests with labels")
    parser.add_argument("--ignore-case", action=argparse.BooleanOptionalAction, default=None,
                        help="fold labels and readings to lower case (default: as the model was trained)")
    parser.add_argument("--label-pattern", metavar="REGEX",
                        help="regular expression on the file stem whose first group is the label "
                             "(default: the training run's, else the stem up to the first '_', '-' or '.')")
    parser.add_argument("--path-column", metavar="NAME", help="manifest column holding image paths (default: detected)")
    parser.add_argument("--label-column", metavar="NAME", help="manifest column holding labels (default: detected)")
    parser.add_argument("--val-split", type=float, metavar="FRACTION",
                        help="evaluate only the held-out part that 'captcha-ocr train' splits off with this fraction")
    parser.add_argument("--seed", type=int, metavar="N", help="seed of that split (default: the training run's, else 42)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--json", metavar="PATH", help="report file (default: OUTPUT_DIR/evaluations/evaluation_<ID>.json)")
    parser.add_argument("--sheet", metavar="PATH", help="also draw the misread images, true and read labels under each, into this PNG")
    parser.add_argument("--worst", type=int, default=10, metavar="N", help="number of worst mistakes to list (default: 10)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N for .pth models (default: cuda when available)")
    parser.add_argument("--any-length", action="store_true", help=ANY_LENGTH_HELP)
    parser.add_argument("--views", type=views_count, default=3, metavar="N", help=VIEWS_HELP)
    parser.add_argument("--output-dir", default="outputs", help="folder for logs/ and evaluations/ (default: outputs)")
    parser.set_defaults(handler=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from captcha_ocr.evaluate import EvaluationSettings, run_evaluation

    if args.val_split is not None and not 0.0 < args.val_split < 1.0:
        raise ValueError(f"--val-split must be between 0 and 1, got {args.val_split}")
    if args.batch_size <= 0 or args.worst < 0:
        raise ValueError("--batch-size must be positive and --worst must not be negative")
    settings = EvaluationSettings(
        ignore_case=args.ignore_case, label_pattern=args.label_pattern, path_column=args.path_column,
        label_column=args.label_column, val_split=args.val_split, seed=args.seed,
        batch_size=args.batch_size, worst=args.worst, any_length=args.any_length, views=args.views,
    )
    evaluation = run_evaluation(
        args.model, args.data, settings, output_dir=args.output_dir,
        json_path=args.json, sheet_path=args.sheet, device=args.device,
    )
    print("\n".join(evaluation.lines), flush=True)
    return 0


# ------------------------------------------------------------------------- runs
def register_runs(commands: Any) -> None:
    parser = commands.add_parser(
        "runs", help="list, show, compare and plot past training runs",
        description="Read the run folders in OUTPUT_DIR/runs/. A run is named by its ID, a unique prefix of it, or 'latest'.",
    )
    parser.add_argument("--output-dir", default="outputs", help="folder holding runs/ (default: outputs)")
    actions = parser.add_subparsers(dest="runs_action", metavar="ACTION")
    listing = actions.add_parser("list", help="one row per run (the default action)")
    show = actions.add_parser("show", help="everything recorded about one run")
    show.add_argument("run", metavar="ID")
    compare = actions.add_parser("compare", help="settings and results of runs side by side")
    compare.add_argument("runs", nargs="+", metavar="ID")
    compare.add_argument("--differences", action="store_true", help="show only the settings that differ")
    plot = actions.add_parser("plot", help="loss, accuracy, CER and learning rate against epoch, in one PNG")
    plot.add_argument("runs", nargs="+", metavar="ID")
    plot.add_argument("--out", metavar="PNG", help="file to write (default: OUTPUT_DIR/curves.png)")
    for action in (listing, show, compare, plot):
        action.add_argument("--output-dir", default=argparse.SUPPRESS, help="folder holding runs/ (default: outputs)")
    parser.set_defaults(handler=_cmd_runs)


def _cmd_runs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from captcha_ocr.record import runs

    runs_dir = Path(args.output_dir) / "runs"
    action = args.runs_action or "list"
    if action == "list":
        ids = runs.run_ids(runs_dir)
        if not ids:
            print(f"No runs in {runs_dir}")
            return 0
        lines = runs.list_lines([runs.load_run(runs_dir, run_id) for run_id in ids])
    elif action == "show":
        lines = runs.show_lines(runs.load_runs(runs_dir, [args.run])[0])
    elif action == "compare":
        records = runs.load_runs(runs_dir, args.runs)
        if len(records) < 2:
            raise ValueError(f"compare needs two or more different runs, got {', '.join(args.runs)}")
        lines = runs.compare_lines(records, only_differences=args.differences)
    else:
        out = Path(args.out) if args.out else Path(args.output_dir) / "curves.png"
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder; give a file path such as {out / 'curves.png'}")
        try:
            written, left_out = runs.plot_runs(runs.load_runs(runs_dir, args.runs), out)
        except RuntimeError as error:
            raise ValueError(str(error)) from None
        lines = [f"Wrote {written}"]
        lines += [f"Left out {run_id}: no completed epoch" for run_id in left_out]
    print("\n".join(lines), flush=True)
    return 0


REGISTRARS.extend([register_evaluate, register_runs])


# ----------------------------------------------------------------------- export
def register_export(commands: Any) -> None:
    parser = commands.add_parser(
        "export", help="export a trained model to ONNX and check it against PyTorch",
        description=(
            "Write an ONNX file (input 'images' (N, 1, H, W) float32, output 'logits' (T, N, C), "
            "dynamic batch) with the alphabet and preprocessing in its metadata, then run check "
            "images through ONNX Runtime and PyTorch. Exits with status 1 and writes nothing when "
            "a decoded text differs or the logits differ by more than --tolerance."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="a .pth model file or training checkpoint")
    parser.add_argument("--out", metavar="FILE", help="ONNX file to write (default: MODEL with the suffix .onnx)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version (default: 17)")
    parser.add_argument(
        "--exporter", choices=("auto", "torchscript", "dynamo"), default="auto",
        help="torch.onnx exporter; auto: TorchScript, falling back to dynamo (default: auto)",
    )
    parser.add_argument(
        "--verify-data", metavar="DIR",
        help="check with these images (default: the training run's images when they still exist, else synthetic CAPTCHAs), plus random inputs",
    )
    parser.add_argument("--verify-limit", type=int, default=200, help="maximum number of images to check with (default: 200)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed absolute logit difference (default: 0.001)")
    parser.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from captcha_ocr.cli import CommandError
    from captcha_ocr.export import VerificationError, export_onnx

    out = Path(args.out) if args.out else Path(args.model).with_suffix(".onnx")
    if out.suffix.lower() != ".onnx":
        raise CommandError(f"--out {out}: the output file must end in .onnx")
    if out.exists() and out.resolve() == Path(args.model).resolve():
        raise CommandError(f"--out {out} is the model file itself; choose another path")
    if out.is_dir():
        raise CommandError(f"--out {out} is a folder; give a file path ending in .onnx")
    if not 7 <= args.opset <= 21:
        raise CommandError(f"--opset {args.opset}: supported opsets are 7 to 21")
    if not (args.tolerance > 0 and args.tolerance < float("inf")):
        raise CommandError(f"--tolerance {args.tolerance}: must be a positive number")
    try:
        result = export_onnx(
            args.model, out, opset=args.opset, exporter=args.exporter, verify_data=args.verify_data,
            tolerance=args.tolerance, verify_limit=args.verify_limit,
        )
    except VerificationError as error:
        print(f"captcha-ocr export: verification failed: {error}", file=sys.stderr)
        return 1
    print(result.report.summary())
    print(f"Wrote {result.path} (opset {result.opset}, {result.exporter} exporter)")
    return 0


# ------------------------------------------------------------------------ serve
def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 1 and 65535, got {port}")
    return port


def register_serve(commands: Any) -> None:
    parser = commands.add_parser(
        "serve", help="serve a model over HTTP (FastAPI)",
        description="Serve POST /predict, POST /predict/batch and GET /health over HTTP, with API docs at /docs.",
    )
    parser.add_argument("model", metavar="MODEL", help="a .pth model or checkpoint, or an exported .onnx file")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=_port, default=8000, help="TCP port, 1 to 65535 (default: 8000)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N for .pth models (default: cuda when available)")
    parser.add_argument("--any-length", action="store_true", help=ANY_LENGTH_HELP)
    parser.add_argument("--views", type=views_count, default=3, metavar="N", help=VIEWS_HELP)
    parser.add_argument("--max-upload-bytes", type=int, default=8 * 2**20, help="largest request body in bytes (default: 8388608)")
    parser.add_argument("--max-pixels", type=int, default=4_000_000, help="reject images with more pixels, before decoding them (default: 4000000)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="maximum images in one /predict/batch request (default: 64)")
    parser.add_argument(
        "--batching", action=argparse.BooleanOptionalAction, default=True,
        help="run requests that arrive together in one forward pass (default: on)",
    )
    parser.add_argument("--batch-wait-ms", type=float, default=2.0, help="how long a forward pass waits for more requests; 0: take only those already queued (default: 2)")
    parser.add_argument("--batch-max-images", type=int, default=32, help="maximum images in one forward pass (default: 32)")
    parser.add_argument("--log-file", metavar="FILE", help="also write the log lines to this file")
    parser.set_defaults(handler=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util

    from captcha_ocr.cli import CommandError

    modules = {"fastapi": ("fastapi",), "uvicorn": ("uvicorn",), "python-multipart": ("python_multipart", "multipart")}
    missing = [name for name, found_as in modules.items() if not any(importlib.util.find_spec(m) for m in found_as)]
    if missing:
        raise CommandError(f"serving needs {', '.join(missing)}: in the captcha-ocr checkout, pip install -e '.[serve]'")
    from captcha_ocr.serve import ServeSettings, serve

    settings = ServeSettings(
        max_upload_bytes=args.max_upload_bytes, max_pixels=args.max_pixels, max_batch_size=args.max_batch_size,
        batching=args.batching, batch_wait_ms=args.batch_wait_ms, batch_max_images=args.batch_max_images,
    )
    return serve(
        args.model, host=args.host, port=args.port, settings=settings, device=args.device,
        log_file=args.log_file, any_length=args.any_length, views=args.views,
    )


REGISTRARS.extend([register_export, register_serve])
