"""Labelled image sources: folders whose file names hold the labels, and manifests.

Everything here turns user input into ``Sample(path, label)`` pairs plus a list
of skipped files with reasons; nothing is decoded yet.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

from captcha_ocr.data.images import is_image_file

# The default rule: the file stem up to the first '_', '-' or '.'.
# "226md.png" -> "226md", "ab12_9f3e.jpg" -> "ab12", "0000.1.png" -> "0000".
DEFAULT_LABEL_PATTERN = r"^([^_.\-]+)"

MANIFEST_SUFFIXES = (".csv", ".tsv", ".txt")
PATH_COLUMNS = ("path", "file", "filename", "file_name", "image", "img", "image_path", "name")
LABEL_COLUMNS = ("label", "text", "captcha", "answer", "code", "target", "value")


class SourceError(ValueError):
    """A data source that cannot be read at all; the message names it and the fix."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str


@dataclass
class Collected:
    """Samples gathered from one or more sources, with the files left out and why."""

    samples: list[Sample] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def extend(self, other: Collected) -> None:
        self.samples.extend(other.samples)
        self.skipped.extend(other.skipped)


def label_from_name(path: Path, pattern: re.Pattern[str]) -> str | None:
    """Apply the label rule to a file name; the first group wins, else the whole match."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    match = pattern.search(stem)
    if match is None:
        return None
    label = match.group(1) if match.groups() else match.group(0)
    return label or None


def _normalise_label(label: str, ignore_case: bool) -> str:
    label = label.strip()
    return label.lower() if ignore_case else label


def collect_folder(
    folder: Path, pattern: re.Pattern[str], ignore_case: bool = False
) -> Collected:
    """Collect every image below ``folder`` (recursively), labelled by its file name."""
    collected = Collected()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.startswith("."):
            continue
        if not is_image_file(path):
            if path.suffix.lower() not in MANIFEST_SUFFIXES or path.name != "labels.csv":
                collected.skipped.append((path, f"not an image file (suffix {path.suffix or 'none'!r})"))
            continue
        label = label_from_name(path, pattern)
        if label is None:
            collected.skipped.append((path, f"no label found in the file name with pattern {pattern.pattern!r}"))
            continue
        label = _normalise_label(label, ignore_case)
        if not label:
            collected.skipped.append((path, "empty label: the file name's label is only whitespace"))
            continue
        collected.samples.append(Sample(path, label))
    return collected


def _pick_column(header: list[str], candidates: Iterable[str], given: str | None, what: str, manifest: Path) -> int:
    lowered = [h.strip().lower() for h in header]
    if given is not None:
        if given.lower() not in lowered:
            raise SourceError(f"{manifest}: no {what} column named {given!r}; columns are {header}")
        return lowered.index(given.lower())
    for name in candidates:
        if name in lowered:
            return lowered.index(name)
    raise SourceError(
        f"{manifest}: cannot tell which column holds the {what}; columns are {header}. "
        f"Name it with --{what}-column"
    )


def _resolve_manifest_path(manifest: Path, written: str) -> Path:
    """Resolve a path written in a manifest, with '/' or '\\', relative to the manifest's folder."""
    written = written.strip()
    if "\\" in written:
        parts = PureWindowsPath(written).parts
        if PureWindowsPath(written).drive:
            return Path(*parts)
        relative = Path(*[p for p in parts if p not in (".", "\\")])
    else:
        relative = Path(written)
    return relative if relative.is_absolute() else manifest.parent / relative


def collect_manifest(
    manifest: Path,
    ignore_case: bool = False,
    path_column: str | None = None,
    label_column: str | None = None,
) -> Collected:
    """Collect samples listed in a CSV or TSV manifest with a header row."""
    text = manifest.read_text(encoding="utf-8-sig")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise SourceError(f"{manifest}: manifest is empty; it needs a header row such as 'path,label'")
    delimiter = "\t" if "\t" in lines[0] else ","
    if manifest.suffix.lower() == ".tsv":
        delimiter = "\t"
    rows = list(csv.reader(lines, delimiter=delimiter))
    header, body = rows[0], rows[1:]
    path_index = _pick_column(header, PATH_COLUMNS, path_column, "path", manifest)
    label_index = _pick_column(header, LABEL_COLUMNS, label_column, "label", manifest)

    collected = Collected()
    for line_number, row in enumerate(body, start=2):
        if len(row) <= max(path_index, label_index):
            collected.skipped.append((manifest, f"line {line_number}: expected {len(header)} columns, got {len(row)}"))
            continue
        path = _resolve_manifest_path(manifest, row[path_index])
        label = _normalise_label(row[label_index], ignore_case)
        if not label:
            collected.skipped.append((path, f"empty label on line {line_number} of {manifest.name}"))
            continue
        if not path.is_file():
            collected.skipped.append((path, f"file not found (line {line_number} of {manifest.name})"))
            continue
        collected.samples.append(Sample(path, label))
    return collected


def collect(
    sources: Iterable[str | Path],
    label_pattern: str = DEFAULT_LABEL_PATTERN,
    ignore_case: bool = False,
    path_column: str | None = None,
    label_column: str | None = None,
) -> Collected:
    """Collect samples from folders and manifests, in the order given."""
    try:
        pattern = re.compile(label_pattern)
    except re.error as error:
        raise SourceError(f"invalid label pattern {label_pattern!r}: {error}") from None
    collected = Collected()
    for source in sources:
        source = Path(source)
        if source.is_dir():
            collected.extend(collect_folder(source, pattern, ignore_case))
        elif source.is_file() and source.suffix.lower() in MANIFEST_SUFFIXES:
            collected.extend(collect_manifest(source, ignore_case, path_column, label_column))
        elif source.is_file():
            raise SourceError(
                f"{source}: data source must be a folder of images or a .csv/.tsv manifest"
            )
        else:
            raise SourceError(f"{source}: data source not found; give a folder of images or a manifest file")
    return collected
