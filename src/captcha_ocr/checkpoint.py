"""Checkpoint and model files: atomic save, safe load, format version.

A file is one dict of tensors and plain Python values, so it loads with
``torch.load(weights_only=True)`` and no code stored in it can run. Model files
(``kind == "model"``) hold what prediction needs; training checkpoints
(``kind == "training"``) add the optimizer, scheduler, history and random states
that resuming needs.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

FORMAT_NAME = "captcha-ocr"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def save_atomic(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``payload`` to a temporary file beside ``path``, then rename it over ``path``.

    A crash or kill at any moment leaves either the previous file or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **payload}
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint or model file with ``weights_only=True`` and check its format.

    Raises :class:`CheckpointError` for missing files, files holding arbitrary
    pickled objects (refused without running them), other programs' files and
    unsupported format versions.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        if "GLOBAL" not in message:
            # Not a pickle that names other code: text, an image or a truncated file.
            detail = message.partition("WeightsUnpickler error:")[2].strip().splitlines()
            raise CheckpointError(
                f"{path}: not a readable checkpoint: the file is corrupt, not a PyTorch file, or contains "
                f"objects other than tensors and plain values ({detail[0] if detail else 'unreadable pickle'}). "
                "Nothing in it was run; give a .pth file written by 'captcha-ocr train'"
            ) from None
        # PyTorch's message suggests weights_only=False, which would run the file's code.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        what = f"it references {found.group(1)}" if found else "it is not a plain checkpoint"
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain values "
            f"({what}). It may be corrupt, tampered with or from another program; nothing in it was run"
        ) from None
    except Exception as error:  # noqa: BLE001 - torch.load raises many types for a corrupt file
        raise CheckpointError(
            f"{path}: not a readable checkpoint, the file is corrupt or not a PyTorch file "
            f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{path}: not a captcha-ocr checkpoint (no '{FORMAT_NAME}' format marker); "
            "use a .pth file written by 'captcha-ocr train'"
        )
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        newer_or_older = "newer" if isinstance(version, int) and version > FORMAT_VERSION else "older"
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is {newer_or_older} than this "
            f"captcha-ocr's version {FORMAT_VERSION}; use the captcha-ocr release that wrote it"
        )
    return payload
