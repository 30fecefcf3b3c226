"""Tasks: named sets of (image, question, answer) samples with train and test splits.

A world builds them: the digits benchmark's built-in tasks, or a transformers host's task
files. A sample's image codes are a 1-D integer array (for a host's tasks a view into the
memory-mapped token store); a split of many samples is a :class:`Samples` table, whose
texts are packed into one buffer per field and whose :class:`Sample` objects are made when
asked for, so a run's memory does not grow by Python objects per sample.
:func:`read_jsonl` is the one checked reader of JSONL files; :func:`loads` reads JSON
marking an object whose keys repeat, which :func:`repeated_key` finds.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, overload

import numpy as np


@dataclass(frozen=True, eq=False)
class Sample:
    """One question about one image. ``codes`` is the tokenized image (VQ codes): a 1-D
    integer array, never copied into Python ints."""

    codes: np.ndarray
    question: str
    answer: str
    label: int | None = None  # the source class, when known (analyses only)
    index: int | None = None  # the source image's index in its image set, when known
    options: tuple[str, ...] | None = None  # a multiple-choice question's options
    source: str | None = None  # where it was read ("file:line", "file: record N"), for messages
    answers: tuple[str, ...] | None = None  # every annotator's answer (the vqa rule)


# How a field of a Sample other than its codes and source is packed: text, or JSON (None,
# tuples); a source is :class:`Prefixed`.
_TEXT_FIELDS = ("question", "answer")
CHUNK = 4096  # values at a time where a column is turned into one array


def _json(value: Any) -> str:
    return "null" if value is None else json.dumps(value, ensure_ascii=False)


class _Column(Sequence[Any]):
    """A read-only column of a table: value i made when asked for (``_value``)."""

    def _value(self, i: int) -> Any:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> Any: ...
    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...
    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self._value(k) for k in range(len(self))[i]]
        return self._value(range(len(self))[i])


class Packed(_Column):
    """Values packed into one UTF-8 buffer: strings as they are, else (``json``) JSON (a
    tuple is read back as a tuple, None as None); a few bytes each beyond their text."""

    def __init__(self, values: Iterable[Any], json_values: bool = False) -> None:
        self.json = json_values
        encode = _json if json_values else str
        parts = [encode(v).encode() for v in values]
        ends = np.cumsum([0, *map(len, parts)], dtype=np.int64)
        self.ends = ends.astype(np.uint32) if ends[-1] < 2**32 else ends
        self.data = b"".join(parts)

    def __len__(self) -> int:
        return len(self.ends) - 1

    def fixed_width(self) -> np.ndarray:
        """Every (text) value's UTF-8 bytes as one fixed-width bytes array (numpy ``S``):
        no Python object per value."""
        lengths = np.diff(self.ends)
        width = max(int(lengths.max(initial=0)), 1)
        out = np.zeros((len(self), width), dtype=np.uint8)
        data = np.frombuffer(self.data, dtype=np.uint8)
        for start in range(0, len(self), CHUNK):  # a few MiB of indices at a time
            part = lengths[start : start + CHUNK]
            rows = np.repeat(np.arange(start, start + len(part)), part)
            first, last = self.ends[start], self.ends[start + len(part)]
            out[
                rows, np.arange(first, last) - np.repeat(self.ends[start : start + len(part)], part)
            ] = data[first:last]
        return out.view(f"S{width}").ravel()

    def _value(self, i: int) -> Any:
        text = self.data[self.ends[i] : self.ends[i + 1]].decode()
        if not self.json:
            return text
        value = json.loads(text)
        return tuple(value) if isinstance(value, list) else value


class Prefixed(_Column):
    """Strings of a few shared prefixes, as sources ("file:line", "file: record N"): each
    prefix, up to the last ``:``, held once, the rest packed; None kept as None."""

    def __init__(self, values: Iterable[str | None]) -> None:
        prefixes: dict[str, int] = {}
        which, rests = [], []
        for value in values:
            head, mark, rest = ("", "", "") if value is None else value.rpartition(":")
            which.append(-1 if value is None else prefixes.setdefault(head + mark, len(prefixes)))
            rests.append(rest)
        self.prefixes, self.which, self.rests = (
            list(prefixes),
            np.array(which, np.int32),
            Packed(rests),
        )

    def __len__(self) -> int:
        return len(self.which)

    def _value(self, i: int) -> str | None:
        return None if self.which[i] < 0 else self.prefixes[self.which[i]] + self.rests[i]


def pack_fields(samples: Iterable[dict[str, Any]]) -> dict[str, Sequence[Any]]:
    """Every field of :class:`Sample` but its codes, packed: the columns of a table of
    `samples` (each a dict by field name; those absent are None)."""
    names = [f.name for f in fields(Sample) if f.name != "codes"]
    values: dict[str, list[Any]] = {name: [] for name in names}
    for sample in samples:
        for name in names:
            values[name].append(sample.get(name))
    columns: dict[str, Sequence[Any]] = {"source": Prefixed(values.pop("source"))}
    return columns | {n: Packed(v, json_values=n not in _TEXT_FIELDS) for n, v in values.items()}


class Samples(Sequence[Sample]):
    """A table of samples: ``codes[i]`` the codes of sample i (any sequence of 1-D arrays,
    such as rows of a token store), every other field of :class:`Sample` a packed column
    (:func:`pack_fields`). Indexing makes a :class:`Sample`; a slice, a list of them."""

    def __init__(self, codes: Sequence[np.ndarray], columns: dict[str, Sequence[Any]]) -> None:
        self.codes, self.columns = codes, columns
        if any(len(c) != len(codes) for c in columns.values()):
            raise ValueError("every column of a sample table has one value per sample")

    @classmethod
    def of(cls, codes: Sequence[np.ndarray], samples: Iterable[dict[str, Any]]) -> Samples:
        """The table of ``codes`` and each sample's other fields (a dict by field name;
        those absent are None)."""
        return cls(codes, pack_fields(samples))

    def __len__(self) -> int:
        return len(self.codes)

    def release(self) -> None:
        """After a scan of every sample: drop the pages of mapped codes it brought into this
        process, where the codes can (``codes.release()``, as a token store's rows)."""
        release = getattr(self.codes, "release", None)
        if release is not None:
            release()

    def _sample(self, i: int) -> Sample:
        values = {name: column[i] for name, column in self.columns.items()}
        return Sample(self.codes[i], **values)

    @overload
    def __getitem__(self, i: int) -> Sample: ...
    @overload
    def __getitem__(self, i: slice) -> list[Sample]: ...
    def __getitem__(self, i: int | slice) -> Sample | list[Sample]:
        if isinstance(i, slice):
            return [self._sample(k) for k in range(len(self))[i]]
        return self._sample(range(len(self))[i])


@dataclass
class Task:
    """A continual-learning task. ``answers`` is its closed answer set, for constrained
    accuracy (empty: open-ended, unless its samples carry options).

    ``scoring`` is the rule that judges a generated answer (:mod:`modecl.core.scoring`).
    ``train`` and ``test`` are lists of samples or :class:`Samples` tables.
    """

    name: str
    answers: tuple[str, ...]
    train: Sequence[Sample] = field(default_factory=list)
    test: Sequence[Sample] = field(default_factory=list)
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
