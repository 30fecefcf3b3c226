"""Tasks: named sets of (image, question, answer) samples with train and test splits."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sample:
    """One question about one image. ``codes`` is the tokenized image (VQ codes)."""

    codes: tuple[int, ...]
    question: str
    answer: str
    label: int | None = None  # the source class, when known (analyses only)
    index: int | None = None  # the source image's index in its image set, when known


@dataclass
class Task:
    """A continual-learning task; ``answers`` is its answer set (for constrained scoring)."""

    name: str
    answers: tuple[str, ...]
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
