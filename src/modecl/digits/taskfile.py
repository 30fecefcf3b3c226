"""User tasks for the digits host: JSONL files of digits indices, image files or codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from modecl.core.files import read_image
from modecl.core.tasks import Sample, Task, TaskFileError, read_jsonl
from modecl.digits.codebook import TOKENS_PER_IMAGE
from modecl.digits.host import Digits

_SPLITS = ("train", "test")
_FIELDS = ("image", "question", "answer", "split")


def load_task_file(path: str | Path, digits: Digits, name: str | None = None) -> Task:
    """Read a user task from a JSONL file: one sample per line, blank lines skipped.

    Each line is an object with exactly the fields ``image``, ``question``, ``answer`` and
    ``split`` (``"train"`` or ``"test"``). ``image`` is one of:

    - an int: an index into the digits images (``digits.pools.images``);
    - a string: an image file, relative to the JSONL file's folder, read with Pillow as
      grayscale with ink bright on dark (as in the digits), box-resized to 8x8 and scaled
      so that 255 -> 16 (a 32x32 bitmap becomes ink counts per 4x4 block, as the digits
      were made);
    - a list of ints: the image's codes, ``TOKENS_PER_IMAGE`` of them, each below
      ``digits.codebook.size``.

    The vocabulary is never extended: it is fixed by the pre-trained host, and a new word
    would have an untrained embedding that no adapter can train, so a word outside
    ``digits.vocab.words`` is an error. Reading is all-or-nothing: any bad line raises
    :class:`TaskFileError` and no task is returned. The task is named ``name`` or the
    file's stem; its answer set is the sorted distinct answers of the file.
    """
    path = Path(path)
    known = set(digits.vocab.words)
    splits: dict[str, list[Sample]] = {s: [] for s in _SPLITS}
    for where, record in read_jsonl(path, _FIELDS, text=("question", "answer", "split")):
        split, sample = _parse_record(record, digits, known, path, where)
        splits[split].append(sample)
    for split, samples in splits.items():
        if not samples:
            raise TaskFileError(f"{path}: no {split} samples")
    answers = tuple(sorted({s.answer for samples in splits.values() for s in samples}))
    return Task(name or path.stem, answers, splits["train"], splits["test"])


def _parse_record(
    record: dict, digits: Digits, known: set[str], path: Path, where: str
) -> tuple[str, Sample]:
    text = {key: " ".join(record[key].lower().split()) for key in ("question", "answer", "split")}
    if text["split"] not in _SPLITS:
        raise TaskFileError(
            f'{where}field \'split\': expected "train" or "test", got {json.dumps(record["split"])}'
        )
    for key in ("question", "answer"):
        unknown = [w for w in text[key].split() if w not in known]
        if unknown:
            raise TaskFileError(
                f"{where}field '{key}': word '{unknown[0]}' is not in the host model's "
                "vocabulary; use only words the host was pre-trained on "
                f"(listed by digits.vocab.words, {len(known)} words)"
            )
    codes, index = _image_codes(record["image"], digits, path.parent, f"{where}field 'image': ")
    return text["split"], Sample(codes, text["question"], text["answer"], index=index)


def _image_codes(
    image: object, digits: Digits, folder: Path, where: str
) -> tuple[np.ndarray, int | None]:
    """An ``image`` field -> (its codes, its digits index when it is one)."""
    # bool is an int subclass in Python, but true/false is never a meant index or code.
    if isinstance(image, int) and not isinstance(image, bool):
        count = len(digits.pools.images)
        if not 0 <= image < count:
            raise TaskFileError(f"{where}index {image} is out of range 0..{count - 1}")
        pixels = digits.pools.images[image]
    elif isinstance(image, str):
        pixels = _read_image(folder / image, where)
    elif isinstance(image, list):
        size = digits.codebook.size
        if len(image) != TOKENS_PER_IMAGE:
            raise TaskFileError(f"{where}expected {TOKENS_PER_IMAGE} codes, got {len(image)}")
        bad = [
            c for c in image if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < size
        ]
        if bad:
            raise TaskFileError(f"{where}code {bad[0]!r} is not an int in 0..{size - 1}")
        return np.asarray(image, dtype=np.int64), None
    else:
        raise TaskFileError(
            f"{where}expected a digits index, an image path or a list of codes, got {image!r}"
        )
    codes = digits.codebook.encode(pixels[None])[0]
    return codes, image if isinstance(image, int) else None


def _read_image(file: Path, where: str) -> np.ndarray:
    """An image file -> [8, 8] pixels on the digits' scale (integers 0..16, ink high)."""
    if not file.is_file():
        raise TaskFileError(f"{where}image file not found: {file}")
    try:  # any mode and bit depth; transparency on black (the digits' background)
        gray = read_image(file, background=(0, 0, 0)).convert("L")
    except ValueError as err:
        raise TaskFileError(f"{where}{err}") from None
    gray = gray.resize((8, 8), Image.Resampling.BOX)
    # Digits pixels are whole counts 0..16; rounding to them keeps a PNG-written digits
    # image exact on the way back and gives user images the host's input domain.
    return np.rint(np.asarray(gray, dtype=np.float32) * (16 / 255))
