"""The training log: unique session IDs, encodings, handlers and progress bars."""

from __future__ import annotations

import io
import logging
import os
import select
import shutil
import struct
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from captcha_ocr.config import TrainConfig
from captcha_ocr.record.log import (
    get_package_logger,
    new_session_id,
    remove_handlers,
    setup_logging,
)
from captcha_ocr.session import train
from tests import process_support as proc

SYMBOLS = {"✗": "[x]", "→": "->", "🎉": "***", "✅": "[saved]", "•": "-"}


@pytest.fixture(scope="module")
def images(generated_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the generated set, so no other module's cache or runs interfere."""
    folder = tmp_path_factory.mktemp("logging-images") / "images"
    shutil.copytree(generated_folder, folder)
    return folder


def test_session_ids_in_the_same_second_differ(tmp_path):
    logs, runs = tmp_path / "logs", tmp_path / "runs"
    moment = datetime(2030, 1, 2, 3, 4, 5)
    ids = [new_session_id(logs, runs, now=moment) for _ in range(3)]

    assert ids == ["20300102_030405", "20300102_030405_2", "20300102_030405_3"]
    assert sorted(p.name for p in logs.glob("training_*.log")) == sorted(f"training_{i}.log" for i in ids)
    assert sorted(p.name for p in runs.iterdir()) == sorted(ids)


FROZEN_CLOCK = """
import sys
from datetime import datetime
import captcha_ocr.record.log as log

class FrozenClock(datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2030, 1, 2, 3, 4, 5)

log.datetime = FrozenClock
from captcha_ocr.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_trainings_started_in_the_same_second(images, tmp_path):
    """Two processes whose clocks read the same second race for one ID; each must get its own."""
    output = tmp_path / "out"
    args = ["train", str(images), *proc.TINY_FLAGS, "--epochs", "1", "--output-dir", str(output)]
    processes = [proc.start([sys.executable, "-c", FROZEN_CLOCK, *args], tmp_path) for _ in range(2)]
    results = [proc.finish(p) for p in processes]
    for code, output_text in results:
        assert code == 0, output_text

    logs = sorted((output / "logs").glob("training_*.log"))
    runs = sorted(p.name for p in (output / "runs").iterdir())
    assert [p.name for p in logs] == ["training_20300102_030405.log", "training_20300102_030405_2.log"]
    assert runs == ["20300102_030405", "20300102_030405_2"]
    for log_file, run_id in zip(logs, runs, strict=True):
        starts = [m for _, m in proc.messages(log_file) if m.startswith("Session ID: ")]
        assert starts == [f"Session ID: {run_id}"]
        assert proc.read_json(output / "runs" / run_id / "summary.json")["status"] == "completed"


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["cp1252", "ascii"])
def test_narrow_console_gets_stand_ins(images, tmp_path, encoding):
    output = tmp_path / "out"
    command = proc.cli("train", str(images), *proc.TINY_FLAGS, "--epochs", "1", "--output-dir", str(output))
    completed = subprocess.run(
        command, cwd=tmp_path, env=proc.child_env(PYTHONIOENCODING=encoding), capture_output=True, timeout=120,
    )
    console = completed.stderr.decode(encoding)
    assert completed.returncode == 0, console
    assert "--- Logging error ---" not in console
    assert "UnicodeEncodeError" not in console
    assert "Traceback" not in console

    _, log_file, _ = proc.only_run(output)
    text = log_file.read_bytes().decode("utf-8")  # strict: the file is UTF-8 whatever the console
    for symbol, stand_in in SYMBOLS.items():
        assert symbol in text, symbol
        if _encodable(symbol, encoding):
            assert symbol in console or stand_in in console, symbol
        else:
            assert symbol not in console, symbol
            assert stand_in in console, stand_in
    # The untrained model misreads every sample: each sample line has its stand-in mark and arrow.
    assert any(line.endswith("'") and "[x] '" in line and "' -> '" in line for line in console.splitlines())
    assert "?" not in "".join(line for line in console.splitlines() if "Sample predictions" in line)


def _encodable(symbol: str, encoding: str) -> bool:
    try:
        symbol.encode(encoding)
        return True
    except UnicodeEncodeError:
        return False


def test_strict_narrow_stream_in_process(images, tmp_path, monkeypatch):
    """A console stream that raises on any character it cannot encode still gets every line."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii", errors="strict", write_through=True)
    monkeypatch.setattr("sys.stderr", stream)
    log_file = tmp_path / "training_x.log"
    logger = setup_logging(log_file, console=True)
    try:
        logger.info("🎉 TRAINING COMPLETED SUCCESSFULLY!")
        logger.info("   ✓ 'ab' → 'ab'  • ✅ ✗")
    finally:
        remove_handlers(logger)
    console = raw.getvalue().decode("ascii")
    assert "*** TRAINING COMPLETED SUCCESSFULLY!" in console
    assert "[ok] 'ab' -> 'ab'  - [saved] [x]" in console
    assert "✓ 'ab' → 'ab'  • ✅ ✗" in log_file.read_text(encoding="utf-8")


def test_missing_console_still_logs_to_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stderr", None)
    log_file = tmp_path / "training_x.log"
    logger = setup_logging(log_file, console=True)
    try:
        logger.warning("written without a console")
    finally:
        remove_handlers(logger)
    assert "[WARNING] written without a console" in log_file.read_text(encoding="utf-8")
    assert capsys.readouterr().out == ""  # not redirected to stdout either


def test_setup_logging_twice_writes_each_line_once(tmp_path, capsys):
    log_file = tmp_path / "training_twice.log"
    setup_logging(log_file, console=True)
    logger = setup_logging(log_file, console=True)
    try:
        logging.getLogger("captcha_ocr.session").info("only once, please")
    finally:
        remove_handlers(logger)
    assert log_file.read_text(encoding="utf-8").count("only once, please") == 1
    assert capsys.readouterr().err.count("only once, please") == 1


def test_root_logger_configured_elsewhere_gets_no_copies(images, tmp_path, capsys):
    """A program that set up the root logger (as logging.basicConfig does) gets no duplicate lines."""
    root_stream = io.StringIO()
    root_handler = logging.StreamHandler(root_stream)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(root_handler)
    root.setLevel(logging.INFO)
    try:
        config = TrainConfig.build(
            {"data": [str(images)], "output_dir": str(tmp_path / "out"), "epochs": 1, **proc.TINY_SETTINGS}
        )
        result = train(config, console=True, progress=False)
    finally:
        root.removeHandler(root_handler)
        root.setLevel(old_level)
    assert result.status == "completed", result.error
    assert "Session ID" not in root_stream.getvalue()
    console = capsys.readouterr().err.splitlines()
    file_lines = result.log_file.read_text(encoding="utf-8").splitlines()
    assert console == file_lines
    assert sum(line.endswith(f"] Session ID: {result.session_id}") for line in console) == 1
    # After training the package logger propagates again, as it did before.
    assert get_package_logger().propagate
    assert not get_package_logger().handlers


def _run_in_terminal(command: list[str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Run ``command`` with a pseudo-terminal as stdin, stdout and stderr; return code and output."""
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()
    # A terminal of 0 columns, the default of a new pseudo-terminal, gets no bars from tqdm.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    process = subprocess.Popen(
        command, cwd=cwd, env=proc.child_env(TERM="xterm"),
        stdin=slave, stdout=slave, stderr=slave, close_fds=True,
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError("training in a terminal timed out")
            ready, _, _ = select.select([master], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every copy of the terminal's other end is closed
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        process.wait(timeout=30)
    return process.returncode, b"".join(chunks).decode("utf-8", errors="replace")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX only")
def test_progress_bars_stay_out_of_the_log_file(images, tmp_path):
    output = tmp_path / "out"
    flags = [f for f in proc.TINY_FLAGS if f != "--no-progress"]
    command = proc.cli("train", str(images), *flags, "--epochs", "2", "--output-dir", str(output))
    code, console = _run_in_terminal(command, tmp_path, timeout=120)
    assert code == 0, console
    # The bars were drawn on the terminal ...
    assert "batch/s" in console or "%|" in console, console
    # ... and none of them reached the file.
    _, log_file, _ = proc.only_run(output)
    raw = log_file.read_bytes()
    assert b"\r" not in raw
    text = raw.decode("utf-8")
    for fragment in ("%|", "batch/s", "img/s", "it/s", "\x1b["):
        assert fragment not in text, fragment
    proc.messages(log_file)  # every line has the log format
