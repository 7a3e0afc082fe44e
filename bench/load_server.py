"""Requests per second and latency of ``captcha-ocr serve`` under concurrent clients.

The script starts the service on a free loopback port in a subprocess and
sends it ``POST /predict`` requests from this process, one PNG per request as a
raw ``image/png`` body. At each concurrency level, that many threads send
requests back to back, each on its own keep-alive connection, for ``--seconds``
after one second of warm-up. The script reports requests per second, median and
99th-percentile latency, errors, and the mean images per forward pass that the
service's micro-batching reached. Then it stops the service.

Without ``--model`` it trains a tiny model on generated CAPTCHAs, exports it to
ONNX and serves that file. The clients share the machine with the service, so
on a small machine the numbers are a floor.

    python bench/load_server.py --model model.onnx                        # 60 s per level
    python bench/load_server.py --concurrency 1 8 --batching both          # batching on and off
    python bench/load_server.py --quick --seconds 10                       # smoke run
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import OUTPUT_DIR, format_table, generated_images, machine_info, write_result

WORK_DIR = OUTPUT_DIR / "load_server"
STARTUP_TIMEOUT = 120.0
WARMUP_SECONDS = 1.0


@dataclass
class Level:
    """The outcome of one concurrency level."""

    concurrency: int
    batching: bool
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    forward_passes: int | None = None

    def row(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_ms)
        return {
            "concurrency": self.concurrency,
            "batching": self.batching,
            "seconds": round(self.seconds, 3),
            "requests": len(ordered),
            "requests_per_second": round(len(ordered) / self.seconds, 2) if self.seconds else 0.0,
            "p50_ms": round(_percentile(ordered, 50), 2) if ordered else None,
            "p99_ms": round(_percentile(ordered, 99), 2) if ordered else None,
            "mean_ms": round(statistics.fmean(ordered), 2) if ordered else None,
            "errors": self.errors,
            "error_examples": self.error_examples[:3],
            "images_per_forward_pass": round(len(ordered) / self.forward_passes, 2) if self.forward_passes else None,
        }


def _percentile(ordered: list[float], percent: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, -(-len(ordered) * percent // 100))
    return ordered[int(rank) - 1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_model() -> Path:
    """Train a one-epoch model on 64 generated CAPTCHAs and export it to ONNX."""
    from captcha_ocr.config import TrainConfig
    from captcha_ocr.export import export_onnx
    from captcha_ocr.session import train

    config = TrainConfig.build({
        "output_dir": str(WORK_DIR), "synthetic_count": 64, "epochs": 1, "height": 32, "width": 96,
        "channels": [8, 8, 16, 16, 16], "rnn_hidden": 16, "batch_size": 16, "warmup_steps": 0,
    })
    print("No --model given: training a tiny model on 64 generated CAPTCHAs ...", flush=True)
    result = train(config, console=False, progress=False)
    if result.status != "completed":
        raise SystemExit(f"training the tiny model failed: {result.error}")
    onnx_path = export_onnx(result.model_path, result.model_path.with_suffix(".onnx")).path
    print(f"Serving {onnx_path}", flush=True)
    return onnx_path


def request_images(count: int) -> list[bytes]:
    images = []
    for image, _ in generated_images(count, "digits", 4, seed=7):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


class Server:
    """``captcha-ocr serve`` in a subprocess; always stopped on exit."""

    def __init__(self, model: Path, port: int, batching: bool, log_path: Path, extra: list[str]) -> None:
        self.port = port
        self.log_path = log_path
        command = [
            sys.executable, "-m", "captcha_ocr", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--batching" if batching else "--no-batching", *extra,
        ]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "w", encoding="utf-8")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with status {self.process.returncode}; see {self.log_path}")
            try:
                status, _ = self.request("GET", "/health")
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"the server did not respond within {STARTUP_TIMEOUT:.0f} s; see {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def forward_passes(self) -> int | None:
        status, body = self.request("GET", "/health")
        return json.loads(body)["batching"]["forward_passes"] if status == 200 else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.log.close()


def client_loop(port: int, images: list[bytes], offset: int, warmup_end: float, end: float, level: Level, lock: threading.Lock) -> None:
    """Send requests back to back on one keep-alive connection until ``end``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies, errors, examples = [], 0, []
    index = offset
    try:
        while True:
            started = time.perf_counter()
            if started >= end:
                break
            body = images[index % len(images)]
            index += 1
            try:
                connection.request("POST", "/predict", body=body, headers={"Content-Type": "image/png"})
                response = connection.getresponse()
                payload = response.read()
                ok = response.status == 200
                problem = f"HTTP {response.status}: {payload[:120]!r}"
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                ok, problem = False, f"{type(error).__name__}: {error}"
            finished = time.perf_counter()
            if started < warmup_end:
                continue
            if ok:
                latencies.append((finished - started) * 1000)
            else:
                errors += 1
                examples.append(problem)
    finally:
        connection.close()
    with lock:
        level.latencies_ms.extend(latencies)
        level.errors += errors
        level.error_examples.extend(examples[:3])


def run_level(server: Server, images: list[bytes], concurrency: int, seconds: float, batching: bool) -> Level:
    level = Level(concurrency, batching)
    lock = threading.Lock()
    start = time.perf_counter()
    warmup_end = start + WARMUP_SECONDS
    end = warmup_end + seconds
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [
            pool.submit(client_loop, server.port, images, i * 7, warmup_end, end, level, lock)
            for i in range(concurrency)
        ]
        time.sleep(max(0.0, warmup_end - time.perf_counter()))
        passes_before = server.forward_passes()
        for future in futures:
            future.result()
    # Requests in flight at the deadline finish after it; time runs to the last of them.
    level.seconds = max(end, time.perf_counter()) - warmup_end
    passes_after = server.forward_passes()
    if passes_before is not None and passes_after is not None:
        level.forward_passes = max(1, passes_after - passes_before)
    return level


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a .pth or .onnx model (default: train and export a tiny one)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds per concurrency level (default: 60)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16], help="client threads per level (default: 1 4 8 16)")
    parser.add_argument("--batching", choices=("on", "off", "both"), default="on", help="the service's micro-batching (default: on)")
    parser.add_argument("--images", type=int, default=32, help="distinct generated PNGs the clients cycle through (default: 32)")
    parser.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="further 'captcha-ocr serve' options, last on the line")
    parser.add_argument("--quick", action="store_true", help="smoke run: the result goes to bench/results/quick/")
    return parser.parse_args()


def measure(model: Path, images: list[bytes], args: argparse.Namespace) -> list[Level]:
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.batching]
    levels = []
    for batching in modes:
        log_path = WORK_DIR / f"serve_batching_{'on' if batching else 'off'}.log"
        with Server(model, _free_port(), batching, log_path, args.serve_args) as server:
            for concurrency in args.concurrency:
                level = run_level(server, images, concurrency, args.seconds, batching)
                levels.append(level)
                row = level.row()
                print(f"batching {'on' if batching else 'off'}, concurrency {concurrency}: "
                      f"{row['requests_per_second']} req/s, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
                      f"{row['errors']} errors", flush=True)
    return levels


def main() -> None:
    args = parse_args()
    if args.seconds <= 0 or any(c <= 0 for c in args.concurrency):
        raise SystemExit("--seconds and --concurrency must be positive")
    model = args.model or tiny_model()
    if not model.is_file():
        raise SystemExit(f"{model}: model file not found")

    rows = [level.row() for level in measure(model, request_images(args.images), args)]
    headers = ["batching", "concurrency", "req/s", "p50 ms", "p99 ms", "errors", "img/pass"]
    print()
    print(format_table(headers, [
        ["on" if r["batching"] else "off", r["concurrency"], f"{r['requests_per_second']:.1f}",
         r["p50_ms"], r["p99_ms"], r["errors"], r["images_per_forward_pass"]]
        for r in rows
    ]))

    path = write_result("load_server", {
        "machine": machine_info("cpu"),
        "model": str(model),
        "settings": {
            "seconds": args.seconds, "warmup_seconds": WARMUP_SECONDS, "concurrency": args.concurrency,
            "batching": args.batching, "images": args.images, "serve_args": args.serve_args,
            "cpu_count": os.cpu_count(),
        },
        "levels": rows,
    }, args.quick)
    print(f"result: {path}")

if __name__ == "__main__":
    main()
