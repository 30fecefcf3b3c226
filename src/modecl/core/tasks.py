"""Tasks: named sets of (image, question, answer) samples with train and test splits.

A world builds them: the digits benchmark's built-in tasks, or a transformers host's task
files. :func:`read_jsonl` is the one checked reader of JSONL files; :func:`loads` reads
JSON marking an object whose keys repeat, which :func:`repeated_key` finds.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Sample:
    """One question about one image. ``codes`` is the tokenized image (VQ codes)."""

    codes: tuple[int, ...]
    question: str
    answer: str
    label: int | None = None  # the source class, when known (analyses only)
    index: int | None = None  # the source image's index in its image set, when known
    options: tuple[str, ...] | None = None  # a multiple-choice question's options
    source: str | None = None  # where it was read ("file:line", "file: record N"), for messages
    answers: tuple[str, ...] | None = None  # every annotator's answer (the vqa rule)


@dataclass
class Task:
    """A continual-learning task. ``answers`` is its closed answer set, for constrained
    accuracy (empty: open-ended, unless its samples carry options).

    ``scoring`` is the rule that judges a generated answer (:mod:`modecl.core.scoring`).
    """

    name: str
    answers: tuple[str, ...]
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    scoring: str = "exact"


class TaskFileError(ValueError):
    """A task file is malformed; the message names the file, the line and the field."""


LINE_LIMIT = 2**20  # bytes of one JSONL record: a sample, not a data set


class _Repeated(dict):
    """A JSON object in which a key repeats (json keeps its last value): ``key`` names it."""

    key: str


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json's ``object_pairs_hook``: the object, marked where a key repeats."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    marked = _Repeated(obj)
    marked.key = next(k for k, _ in pairs if k in seen or seen.add(k))
    return marked


def loads(text: str) -> Any:
    """JSON, each object whose keys repeat marked for :func:`repeated_key`."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def repeated_key(value: Any) -> str | None:
    """A key that repeats in an object of ``value`` (read by :func:`loads`), else None."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, _Repeated):
            return item.key
        todo += item.values() if isinstance(item, dict) else item if isinstance(item, list) else []
    return None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file, streamed; every fault names the file."""
    if not path.exists():
        raise TaskFileError(f"{path}: file not found")
    if path.is_dir():
        raise TaskFileError(f"{path}: is a directory, expected a file")
    try:
        with path.open("rb") as lines:
            for lineno, raw in enumerate(lines, start=1):
                if len(raw) > LINE_LIMIT:
                    raise TaskFileError(
                        f"{path}:{lineno}: a line of {len(raw)} bytes, over the limit of "
                        f"{LINE_LIMIT} bytes for one record"
                    )
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise TaskFileError(
                        f"{path}:{lineno}: not UTF-8 text (byte {raw[err.start]:#04x} at "
                        f"column {err.start + 1})"
                    ) from None
    except OSError as err:
        raise TaskFileError(f"{path}: cannot read: {err.strerror or err}") from None


def read_jsonl(
    path: Path, required: Sequence[str], optional: Sequence[str] = (), text: Sequence[str] = ()
) -> Iterator[tuple[str, dict]]:
    """(where, record) per non-blank line of a JSONL file: objects with known fields only.

    `where` ("file:line: ") prefixes any error about the line. Every `required` field is
    present, and every `text` field that is present is a non-empty string.
    """
    known = (*required, *optional)
    for lineno, line in _lines(Path(path)):
        if not line.strip():
            continue
        where = f"{path}:{lineno}: "
        try:
            record = loads(line)
        except json.JSONDecodeError as err:
            message = f"{where}invalid JSON: {err.msg} (column {err.colno})"
            raise TaskFileError(message) from None
        except RecursionError:
            raise TaskFileError(f"{where}JSON nested too deeply") from None
        if not isinstance(record, dict):
            raise TaskFileError(f"{where}expected a JSON object, got {type(record).__name__}")
        if (key := repeated_key(record)) is not None:
            raise TaskFileError(f"{where}key {key!r} repeats in one object")
        for key in record:
            if key not in known:
                raise TaskFileError(
                    f"{where}field '{key}': unknown field; the fields are {', '.join(known)}"
                )
        for key in required:
            if key not in record:
                raise TaskFileError(f"{where}field '{key}': missing")
        for key in text:
            value = record.get(key, "x")
            if not isinstance(value, str) or not value.strip():
                raise TaskFileError(
                    f"{where}field '{key}': expected a non-empty string, got {reprlib.repr(value)}"
                )
        yield where, record
