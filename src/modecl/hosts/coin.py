"""CoIN's task folders, read as CoIN publishes them: no conversion step.

A CoIN task folder (``ScienceQA/``, ``TextVQA/``, ...) holds ``train.json`` and
``test.json``, each a JSON array of records. Train records are in LLaVA's form::

    {"id": "1", "image": "ScienceQA/train/1/image.png",
     "conversations": [
        {"from": "human", "value": "<image>\\nWhich is a mammal?\\nA. frog\\nB. cat"},
        {"from": "gpt", "value": "B"}]}

test records in CoIN's::

    {"question_id": "7", "image": "ScienceQA/test/7/image.png",
     "text": "Which is a mammal?\\nA. frog\\nB. cat", "answer": "B"}

optionally with ``"answers"``, every annotator's answer (TextVQA's ten), which the `vqa`
rule scores against. Other fields are ignored, but an ``id`` (train) or ``question_id``
(test) that an earlier record of the file has is refused (a sample would count twice).

- Image paths are relative to the image root (CoIN's ``cl_dataset/``; by default the task
  folder's parent), not to the file; a path that leaves the root (``../``, absolute) is
  refused.
- The ``<image>`` placeholder is removed wherever it stands, and may be absent: the host's
  format puts the image span before the question, as for JSONL tasks.
- Options are the question's lines ``A. ...``, ``B. ...`` (the last run of two or more
  consecutive letters from A): they give the `choice` rule and the constrained accuracy
  their options. The question keeps them as written.
- A conversation of several exchanges (human, gpt, human, gpt, ...) gives one sample per
  gpt turn: its question is every earlier turn's text, one per line, then the human turn
  it answers; its source names that gpt turn ("train.json: record 3 turn 3").
- A task's rule is the one given for its name (``[scoring]``), else the paper's
  (:func:`~modecl.core.scoring.paper_rule`: ScienceQA `choice`, ImageNet `contains`, any
  other `exact`).

Records are numbered from 0, as in the array (``jq '.[3]'``). A record in which a key
repeats is refused (JSON would keep its last value). A bad record raises
:class:`~modecl.core.tasks.TaskFileError` naming the file, the record and the field, before
any image is tokenized.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from modecl.core.files import read_text
from modecl.core.scoring import paper_rule
from modecl.core.tasks import Task, TaskFileError, loads, repeated_key
from modecl.hosts.tasks import ImageTokenizer, Row, check_images, check_rows, rows_task, text_list

__all__ = [
    "COIN_FILES",
    "check_coin_folder",
    "coin_rows",
    "folder_name",
    "load_coin_task",
    "parse_options",
]

COIN_FILES = ("train.json", "test.json")
FILE_LIMIT = 2**30  # bytes of one instruction file (CoIN's largest hold tens of MB)

_PLACEHOLDER = "<image>"
_OPTION = re.compile(r"^([A-Z])\.[ \t]*(\S.*)$", re.MULTILINE)
_JSON_KINDS = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


def _kind(value: Any) -> str:
    return _JSON_KINDS.get(type(value), "number")


def _absolute(folder: Path) -> Path:
    """`folder` as an absolute path, "." and ".." resolved but not symbolic links."""
    return Path(os.path.abspath(folder))


def folder_name(folder: str | Path) -> str:
    """A CoIN task's name: its folder's (also for "." or "ScienceQA/")."""
    return _absolute(Path(folder)).name


def parse_options(question: str) -> tuple[str, ...] | None:
    """The options of a multiple-choice question: its lines ``A. ...``, ``B. ...``."""
    options: list[str] = []
    for letter, text in _OPTION.findall(question):
        if letter == "A":
            options = [text.strip()]
        elif options and ord(letter) - ord("A") == len(options):
            options.append(text.strip())
        else:
            options = []
    return tuple(options) if len(options) > 1 else None


def _records(path: Path) -> list[Any]:
    """The records of an instruction file: a JSON array."""
    text = read_text(path, TaskFileError, FILE_LIMIT)
    try:
        data = loads(text)
    except json.JSONDecodeError as err:
        message = f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})"
        raise TaskFileError(message) from None
    except RecursionError:
        raise TaskFileError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, list):
        raise TaskFileError(f"{path}: expected a JSON array of records, got {_kind(data)}")
    return data


def _text(record: dict, key: str, where: str) -> str:
    """A field holding a non-empty string, stripped."""
    if key not in record:
        raise TaskFileError(f"{where}field '{key}': missing")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise TaskFileError(
            f"{where}field '{key}': expected a non-empty string, got {reprlib.repr(value)}"
        )
    return value.strip()


def _question(text: str, where: str) -> str:
    """A question without its image placeholder; `where` names its field (and turn)."""
    question = text.replace(_PLACEHOLDER, "").strip()
    if not question:
        raise TaskFileError(f"{where}no text beside the {_PLACEHOLDER} placeholder")
    return question


def _turns(record: dict, where: str) -> list[str]:
    """The texts of a record's conversation: human and gpt turns in turn, ending on gpt."""
    at = f"{where}field 'conversations': "
    if "conversations" not in record:
        raise TaskFileError(f"{at}missing")
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise TaskFileError(f"{at}expected a non-empty array of turns, got {reprlib.repr(turns)}")
    texts = []
    for k, turn in enumerate(turns):
        role = ("human", "gpt")[k % 2]
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise TaskFileError(
                f"{at}turn {k}: expected an object with 'from' and a string 'value', "
                f"got {reprlib.repr(turn)}"
            )
        if turn.get("from") != role:
            raise TaskFileError(f"{at}turn {k}: expected from {role!r}, got {turn.get('from')!r}")
        texts.append(_question(turn["value"], f"{at}turn {k}: "))
    if len(texts) % 2:
        raise TaskFileError(f"{at}no gpt turn answers turn {len(texts) - 1}")
    return texts


def _object(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise TaskFileError(f"{where}expected a JSON object, got {_kind(record)}")
    if (key := repeated_key(record)) is not None:
        raise TaskFileError(f"{where}key {key!r} repeats in one object")
    return record


def _image(record: dict, root: Path, inside: str, where: str) -> Path:
    """A record's image file, under the image root; `inside`: the root's absolute path and
    a separator, the start of every path under it ("." and ".." resolved, not links)."""
    name = _text(record, "image", where)
    full = os.path.abspath(os.path.join(inside, name))
    if not full.startswith(inside) and full != os.path.dirname(inside):
        raise TaskFileError(f"{where}field 'image': {name!r} leaves the image root {root}")
    return root / name


def _inside(root: Path) -> str:
    """The start of every absolute path under `root` (`_image`)."""
    return os.path.join(_absolute(root), "")


def _unique_id(record: dict, key: str, seen: dict[str, int], i: int, where: str) -> None:
    """Refuse an id (field `key`) that an earlier record has; `seen`: ids -> record."""
    if key not in record:
        return
    value = json.dumps(record[key], sort_keys=True)
    if value in seen:
        raise TaskFileError(
            f"{where}field '{key}': {reprlib.repr(record[key])} repeats, first at record "
            f"{seen[value]}"
        )
    seen[value] = i


def _train_rows(path: Path, root: Path) -> list[Row]:
    rows, ids, inside = [], {}, _inside(root)
    for i, record in enumerate(_records(path)):
        where = f"{path}: record {i}: "
        record = _object(record, where)
        _unique_id(record, "id", ids, i, where)
        image = _image(record, root, inside, where)
        turns = _turns(record, where)
        for k in range(1, len(turns), 2):
            at = where if len(turns) == 2 else f"{path}: record {i} turn {k}: "
            question = "\n".join(turns[:k])
            options = parse_options(turns[k - 1])  # of the question this turn answers
            field = "conversations"
            rows.append(Row(at, image, "train", question, turns[k], options, None, field, field))
    return rows


def _test_rows(path: Path, root: Path) -> list[Row]:
    rows, ids, inside = [], {}, _inside(root)
    for i, record in enumerate(_records(path)):
        where = f"{path}: record {i}: "
        record = _object(record, where)
        _unique_id(record, "question_id", ids, i, where)
        image = _image(record, root, inside, where)
        question = _question(_text(record, "text", where), f"{where}field 'text': ")
        answer = _text(record, "answer", where)
        answers = record.get("answers")
        answers = None if answers is None else text_list(answers, where, "answers")
        options = parse_options(question)
        rows.append(Row(where, image, "test", question, answer, options, answers, "answer", "text"))
    return rows


def coin_rows(folder: str | Path, image_root: str | Path | None = None) -> list[Row]:
    """The checked records of a CoIN task folder as rows (train, then test)."""
    folder = Path(folder)
    holds = f"a CoIN task folder holds {' and '.join(COIN_FILES)}"
    if not folder.is_dir():
        raise TaskFileError(f"{folder}: not a folder; {holds}")
    for name in COIN_FILES:
        if not (folder / name).exists():
            raise TaskFileError(f"{folder}: is a directory without {name}; {holds}")
    root = _absolute(folder).parent if image_root is None else Path(image_root)
    return [*_train_rows(folder / "train.json", root), *_test_rows(folder / "test.json", root)]


def check_coin_folder(
    folder: str | Path,
    image_root: str | Path | None = None,
    name: str | None = None,
    scoring: str | None = None,
    tokenized: Collection[str] = (),
) -> tuple[list[Row], str]:
    """Every check of :func:`load_coin_task` that needs no model: records, fields, the
    rule's needs, splits, image files present unless already ``tokenized`` (to run before
    a host loads); the checked rows and the task's rule."""
    folder = Path(folder)
    rows = coin_rows(folder, image_root)
    rule = scoring or paper_rule(name or folder_name(folder))
    check_rows(folder, rows, rule)
    check_images(rows, tokenized)
    return rows, rule


def load_coin_task(
    folder: str | Path,
    images: ImageTokenizer,
    image_root: str | Path | None = None,
    name: str | None = None,
    scoring: str | None = None,
    answers: Sequence[str] | None = None,
) -> Task:
    """Read a CoIN task folder (module doc) into a task named `name` (default: the
    folder's name); `scoring` overrides the paper's rule, `answers` declares a closed
    answer set (constrained accuracy)."""
    folder = Path(folder)
    name = name or folder_name(folder)
    rows = coin_rows(folder, image_root)
    rule = scoring or paper_rule(name)
    check_rows(folder, rows, rule)
    return rows_task(name, rows, rule, images, answers)
