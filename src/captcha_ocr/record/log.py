"""Log handlers, the line format, the console fallback and session IDs.

Every line, on the console and in the file, reads
``[2024-03-16 14:30:22] [INFO] message``. The file is always UTF-8; a console
that cannot show a symbol gets an ASCII stand-in instead of an encoding error.
Library modules log through ``logging.getLogger(__name__)``, and only
:func:`setup_logging`, called by the entry points, attaches handlers to the
package logger.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path

LOGGER_NAME = "captcha_ocr"
LINE_FORMAT = "[%(asctime)s] [%(levelname)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
SESSION_ID_FORMAT = "%Y%m%d_%H%M%S"

# Stand-ins for symbols a narrow console encoding (cp1252, ascii) cannot show.
ASCII_STAND_INS = {
    "✓": "[ok]",
    "✗": "[x]",
    "→": "->",
    "🎉": "***",
    "✅": "[saved]",
    "•": "-",
    "…": "...",
    "⚠": "[!]",
}

_HANDLER_MARK = "_captcha_ocr_handler"


class ConsoleHandler(logging.Handler):
    """Writes formatted lines to the current ``sys.stderr``, safe for any encoding.

    Lines go through ``tqdm.write`` so that an active progress bar is cleared
    and redrawn around them instead of being broken.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            if stream is None:  # no console at all, as under pythonw
                return
            message = self.format(record)
            encoding = getattr(stream, "encoding", None) or "utf-8"
            message = to_console_text(message, encoding)
            from tqdm import tqdm

            tqdm.write(message, file=stream)
        except Exception:  # noqa: BLE001 - logging must never raise into training
            self.handleError(record)


def to_console_text(message: str, encoding: str) -> str:
    """Replace the characters ``encoding`` cannot represent with ASCII stand-ins."""
    try:
        message.encode(encoding)
        return message
    except (UnicodeEncodeError, LookupError):
        pass
    for symbol, stand_in in ASCII_STAND_INS.items():
        message = message.replace(symbol, stand_in)
    try:
        return message.encode(encoding, errors="replace").decode(encoding)
    except LookupError:
        return message.encode("ascii", errors="replace").decode("ascii")


class RankFilter(logging.Filter):
    """Prefixes each message with the process rank, for ranks other than 0."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_rank_prefixed", False):
            record.msg = f"[rank {self.rank}] {record.msg}"
            record._rank_prefixed = True
        return True


def get_package_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def remove_handlers(logger: logging.Logger | None = None) -> None:
    """Detach and close the handlers :func:`setup_logging` attached.

    Once none is left, the logger propagates again, so that after training the
    package's messages reach whatever logging the calling program set up.
    """
    logger = logger or get_package_logger()
    for handler in logger.handlers[:]:
        if getattr(handler, _HANDLER_MARK, False):
            logger.removeHandler(handler)
            handler.close()
    if not logger.handlers:
        logger.propagate = True


def setup_logging(
    log_file: Path | None,
    console: bool = True,
    rank: int = 0,
    level: int = logging.INFO,
) -> logging.Logger:
    """Attach the file and console handlers to the package logger, replacing earlier ones.

    Calling it twice never duplicates lines, and the package logger does not
    propagate to the root logger, so a library that configured the root logger
    does not print every line a second time. On ranks other than 0 only
    warnings and errors are written, prefixed with the rank.
    """
    logger = get_package_logger()
    remove_handlers(logger)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    formatter = logging.Formatter(LINE_FORMAT, datefmt=DATE_FORMAT)
    handler_level = level if rank == 0 else logging.WARNING
    handlers: list[logging.Handler] = []
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a", encoding="utf-8"))
    if console:
        handlers.append(ConsoleHandler())
    for handler in handlers:
        handler.setLevel(handler_level)
        handler.setFormatter(formatter)
        if rank != 0:
            handler.addFilter(RankFilter(rank))
        setattr(handler, _HANDLER_MARK, True)
        logger.addHandler(handler)
    return logger


def new_session_id(logs_dir: Path, runs_dir: Path, now: datetime | None = None) -> str:
    """Reserve a session ID by creating its log file and run folder exclusively.

    The ID is the start time, ``YYYYMMDD_HHMMSS``; when another session took
    that second, ``_2``, ``_3``, ... is appended, so ``training_*.log`` still
    matches every log file.
    """
    logs_dir.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    base = (now or datetime.now()).strftime(SESSION_ID_FORMAT)
    for attempt in range(1, 10_000):
        session_id = base if attempt == 1 else f"{base}_{attempt}"
        try:
            os.mkdir(runs_dir / session_id)
        except FileExistsError:
            continue
        try:
            with open(logs_dir / f"training_{session_id}.log", "x", encoding="utf-8"):
                pass
        except FileExistsError:
            os.rmdir(runs_dir / session_id)
            continue
        return session_id
    raise RuntimeError(f"could not reserve a session ID for {base} in {runs_dir}")


def new_log_id(logs_dir: Path, prefix: str, now: datetime | None = None) -> str:
    """Reserve an ID by creating ``<prefix>_<ID>.log`` in ``logs_dir`` exclusively.

    For commands that keep a log but no run folder, such as ``evaluation``.
    The ID has the same form as a session ID, ``YYYYMMDD_HHMMSS`` with ``_2``,
    ``_3``, ... appended when another process took that second.
    """
    logs_dir.mkdir(parents=True, exist_ok=True)
    base = (now or datetime.now()).strftime(SESSION_ID_FORMAT)
    for attempt in range(1, 10_000):
        log_id = base if attempt == 1 else f"{base}_{attempt}"
        try:
            with open(logs_dir / f"{prefix}_{log_id}.log", "x", encoding="utf-8"):
                pass
        except FileExistsError:
            continue
        return log_id
    raise RuntimeError(f"could not reserve a {prefix} log ID for {base} in {logs_dir}")
