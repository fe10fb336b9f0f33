"""Calibration text: read documents, split off a held-out set and tokenize into batches."""

from __future__ import annotations

import ast
import hashlib
import json
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from subclone.errors import CalibrationError
from subclone.options import CalibrationOptions

# Docstrings shorter than this are mostly one-line summaries with little text.
_MIN_DOCSTRING_CHARS = 200


@dataclass
class CalibrationTexts:
    """Documents for calibration and a disjoint held-out set for the quality check."""

    source: str
    calibration: list[str]
    holdout: list[str]
    sha256: str


def read_documents(path: Path) -> list[str]:
    """Read a .txt (documents separated by blank lines) or .jsonl (a 'text' field per line) file."""
    if not path.is_file():
        raise CalibrationError(f"calibration file {str(path)!r} does not exist", param="calibration.source")
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"calibration file {path.name} is not UTF-8 text: {exc}", param="calibration.source") from None
    if suffix == ".txt":
        docs = [" ".join(block.split()) for block in raw.replace("\r\n", "\n").split("\n\n")]
    elif suffix == ".jsonl":
        docs = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{path.name} line {number} is not valid JSON: {exc}", param="calibration.source") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CalibrationError(f"{path.name} line {number} has no string field 'text'", param="calibration.source")
            docs.append(record["text"])
    else:
        raise CalibrationError(f"calibration file {path.name} must end in .txt or .jsonl", param="calibration.source")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibrationError(f"calibration file {path.name} contains no text", param="calibration.source")
    return docs


def stdlib_docstrings(limit: int, seed: int) -> list[str]:
    """Collect docstrings from the running Python's standard library sources.

    The text is real English prose written by people, available offline on any
    machine with Python. Files are visited in a seeded order and parsed with
    ``ast`` (nothing is imported) until ``limit`` docstrings are found.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts and "idlelib" not in p.parts
    )
    if not files:
        raise CalibrationError(f"no standard library sources found under {root}", param="calibration.source")
    random.Random(seed).shuffle(files)
    docs: list[str] = []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))]
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
                docs.append(" ".join(doc.split()))
        if len(docs) >= limit:
            break
    if not docs:
        raise CalibrationError("the standard library sources contain no usable docstrings", param="calibration.source")
    return docs[:limit]


def load_texts(options: CalibrationOptions, eval_texts: int) -> CalibrationTexts:
    """Gather documents, shuffle them with the seed and split off ``eval_texts`` held-out documents."""
    wanted = options.num_samples + eval_texts
    if options.texts is not None:
        docs = [t for t in options.texts if t.strip()]
    elif options.source is not None and options.source.startswith("builtin:"):
        docs = stdlib_docstrings(limit=wanted, seed=options.seed)
    else:
        docs = read_documents(Path(str(options.source)))
    rng = random.Random(options.seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    shuffled = [docs[i] for i in order]
    # Keep a held-out share even for small sources, but leave calibration at least one document.
    holdout_count = min(eval_texts, max(0, len(shuffled) - 1), max(1, int(len(shuffled) * options.holdout_fraction)) if len(shuffled) > 1 else 0)
    holdout = shuffled[:holdout_count]
    calibration = shuffled[holdout_count: holdout_count + options.num_samples]
    digest = hashlib.sha256()
    for doc in calibration:
        digest.update(doc.encode("utf-8"))
        digest.update(b"\x00")
    return CalibrationTexts(source=options.describe_source(), calibration=calibration, holdout=holdout, sha256=digest.hexdigest())


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give the tokenizer a padding token when it has none; padded positions are masked anyway."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise CalibrationError("the parent's tokenizer has no pad, eos or unk token to pad batches with")
    return tokenizer


@dataclass
class Batch:
    input_ids: torch.Tensor  # (batch, tokens)
    attention_mask: torch.Tensor  # (batch, tokens), 1 for real and special tokens
    real_tokens: torch.Tensor  # (batch, tokens) bool, excludes padding and special tokens


def iter_batches(
    tokenizer: Any, texts: list[str], *, sequence_length: int, batch_size: int, padding_side: str = "right"
) -> Iterator[Batch]:
    """Tokenize texts into padded batches with a mask of the tokens that enter statistics."""
    tokenizer.padding_side = padding_side
    for start in range(0, len(texts), batch_size):
        chunk = texts[start: start + batch_size]
        encoded = tokenizer(
            chunk,
            padding=True,
            truncation=True,
            max_length=sequence_length,
            return_tensors="pt",
            return_special_tokens_mask=True,
        )
        attention = encoded["attention_mask"]
        special = encoded["special_tokens_mask"].bool()
        real = attention.bool() & ~special
        yield Batch(input_ids=encoded["input_ids"], attention_mask=attention, real_tokens=real)


def count_real_tokens(tokenizer: Any, texts: list[str], sequence_length: int) -> int:
    total = 0
    for batch in iter_batches(tokenizer, texts, sequence_length=sequence_length, batch_size=64):
        total += int(batch.real_tokens.sum())
    return total
