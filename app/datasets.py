"""Uploaded calibration datasets: validation of the file and its hand-over to the engine.

A dataset is kept in the database, so any worker can read it without shared
storage, and written to a scratch file when a job runs, because the engine
reads calibration text from a ``.txt`` or ``.jsonl`` file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import ValidationFailed
from subclone.errors import FieldError

logger = logging.getLogger(__name__)

FORMATS = ("txt", "jsonl")


@dataclass(frozen=True)
class ParsedDataset:
    format: str
    num_documents: int
    sha256: str


def detect_format(filename: str) -> str:
    """Return ``txt`` or ``jsonl`` from the file name's suffix; raise ValidationFailed otherwise."""
    suffix = Path(filename).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ValidationFailed(
            f"dataset file {filename!r} must end in .txt or .jsonl",
            errors=[FieldError("file", filename, "unsupported file type", allowed=".txt, .jsonl")],
        )
    return suffix


def parse_dataset(filename: str, content: bytes) -> ParsedDataset:
    """Check that ``content`` is UTF-8 text with at least one document and count the documents.

    A ``.txt`` file contains documents separated by blank lines. A ``.jsonl`` file
    contains one JSON object per line with a string field ``text``; the error names
    the first bad line.
    """
    format_ = detect_format(filename)
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationFailed(
            f"dataset {filename!r} is not UTF-8 text (invalid byte at offset {exc.start})",
            errors=[FieldError("file", filename, "not UTF-8 text")],
        ) from None

    if format_ == "txt":
        count = sum(1 for block in text.replace("\r\n", "\n").split("\n\n") if block.strip())
    else:
        count = 0
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValidationFailed(
                    f"line {number} of {filename!r} is not JSON: {exc.msg}",
                    errors=[FieldError("file", f"line {number}", "not a JSON object")],
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValidationFailed(
                    f"line {number} of {filename!r} needs a string field 'text'",
                    errors=[FieldError("file", f"line {number}", "missing string field 'text'")],
                )
            if record["text"].strip():
                count += 1

    if count == 0:
        raise ValidationFailed(
            f"dataset {filename!r} contains no non-empty document",
            errors=[FieldError("file", filename, "no documents")],
        )
    return ParsedDataset(
        format=format_, num_documents=count, sha256=hashlib.sha256(content).hexdigest()
    )


def write_dataset_file(directory: Path, dataset_id: str, format_: str, content: bytes) -> Path:
    """Write a dataset into ``directory`` as a file the engine can read and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{dataset_id}.{format_}"
    path.write_bytes(content)
    return path
