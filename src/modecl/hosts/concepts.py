"""Concepts file (`modecl train --concepts`): prompts to draw from and reference images.

One concept per line (blank lines skipped)::

    {"concept": "pet_dog1", "prompts": ["photo of a dog", "a dog in times square"],
     "images": "benchmark_dataset/pet_dog1"}

`concept` names it (letters, digits, `.`, `_`, `-`, not starting with a dot or dash; unique
in the file; it names the folder of its drawings). `prompts` is a non-empty list of
non-empty strings. `images` is a folder relative to the file; its image files (`.png`,
`.jpg`, `.jpeg`, `.webp`, `.bmp`, any case; not its subfolders) are the concept's reference
images, in name order. Drawings take the size (code grid) at which the host tokenizes the
concept's first reference image. A bad line raises :class:`~modecl.core.tasks.TaskFileError`
naming the file, the line and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modecl.core.tasks import TaskFileError, read_jsonl
from modecl.hosts.tasks import ImageTokenizer

__all__ = ["IMAGE_SUFFIXES", "Concept", "check_concepts_file", "load_concepts"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Concept:
    """A concept's prompts and reference images; `codes`: its first image's tokens."""

    name: str
    prompts: tuple[str, ...]
    images: tuple[Path, ...]
    codes: np.ndarray
    source: str  # "file:line", for messages


def _rows(path: Path) -> list[tuple[str, str, tuple[str, ...], tuple[Path, ...]]]:
    """The checked lines of a concepts file: (where, name, prompts, reference images)."""
    rows, seen = [], {}
    for where, record in read_jsonl(path, ("concept", "prompts", "images"), text=("concept",)):
        name = record["concept"]
        if not NAME.fullmatch(name):
            raise TaskFileError(
                f"{where}field 'concept': {name!r} is not a name of letters, digits, '.', '_' "
                "and '-' (it names a folder)"
            )
        if name in seen:
            raise TaskFileError(f"{where}field 'concept': {name!r} repeats, first at {seen[name]}")
        seen[name] = where.rstrip(": ")
        prompts = record["prompts"]
        if not isinstance(prompts, list) or not prompts:
            raise TaskFileError(f"{where}field 'prompts': expected a non-empty list of strings")
        if not all(isinstance(p, str) and p.strip() for p in prompts):
            raise TaskFileError(f"{where}field 'prompts': expected non-empty strings")
        if not isinstance(record["images"], str) or not record["images"].strip():
            raise TaskFileError(f"{where}field 'images': expected a folder, relative to the file")
        folder = path.parent / record["images"]
        if not folder.is_dir():
            raise TaskFileError(f"{where}field 'images': folder not found: {folder}")
        try:
            found = [f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES]
        except OSError as err:
            raise TaskFileError(f"{where}field 'images': cannot read {folder}: {err}") from None
        images = tuple(sorted(f for f in found if f.is_file()))
        if not images:
            raise TaskFileError(
                f"{where}field 'images': no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}"
            )
        rows.append((where, name, tuple(p.strip() for p in prompts), images))
    if not rows:
        raise TaskFileError(f"{path}: no concepts")
    return rows


def check_concepts_file(path: Path) -> None:
    """Every check of :func:`load_concepts` that needs no model (to run before a host loads)."""
    _rows(Path(path))


def load_concepts(path: str | Path, images: ImageTokenizer) -> list[Concept]:
    """Read a concepts file (module doc); each concept's first image is tokenized."""
    rows = _rows(Path(path))
    codes = images([(files[0], f"{where}field 'images': ") for where, _, _, files in rows])
    return [
        Concept(name, prompts, files, first, where.rstrip(": "))
        for (where, name, prompts, files), first in zip(rows, codes, strict=True)
    ]
