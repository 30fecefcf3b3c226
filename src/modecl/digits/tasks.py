"""The digits' language and its five built-in continual tasks.

Each task is one question about a digit image with a short text answer derived from the
label or from the pixels. Train samples come from the continual-train pool, test samples
from the test pool. The instruction preview asks the same questions on pre-training-pool
images of a few digits only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from modecl.core.tasks import Sample, Task
from modecl.digits.codebook import Codebook
from modecl.digits.data import DIGIT_WORDS, Pools

NUMBER_WORDS = (*DIGIT_WORDS, "ten", "eleven", "twelve")
CAPTION_QUESTION = "what digit is this"
DRAW_PROMPT = "draw a {}"


def parity(image: np.ndarray, label: int, margin: float) -> str:
    return "even" if label % 2 == 0 else "odd"


def comparison(image: np.ndarray, label: int, margin: float) -> str:
    return "yes" if label > 4 else "no"


def arithmetic(image: np.ndarray, label: int, margin: float) -> str:
    return NUMBER_WORDS[label + 3]


def mirrored(image: np.ndarray, label: int, margin: float) -> str:
    return DIGIT_WORDS[label]


def spatial(image: np.ndarray, label: int, margin: float) -> str | None:
    """Which half (rows 0-3 or 4-7) holds more ink; None when within ``margin`` of all ink."""
    top, bottom = float(image[:4].sum()), float(image[4:].sum())
    if abs(top - bottom) < margin * (top + bottom):
        return None
    return "top" if top > bottom else "bottom"


@dataclass(frozen=True)
class TaskRule:
    question: str
    answers: tuple[str, ...]
    answer: Callable[[np.ndarray, int, float], str | None]
    transform: Callable[[np.ndarray], np.ndarray] | None = None


def mirror(images: np.ndarray) -> np.ndarray:
    return images[..., ::-1].copy()


TASK_RULES: dict[str, TaskRule] = {
    "parity": TaskRule("is this digit even or odd", ("even", "odd"), parity),
    "comparison": TaskRule("is this digit greater than four", ("yes", "no"), comparison),
    "arithmetic": TaskRule("what is this digit plus three", NUMBER_WORDS[3:], arithmetic),
    "mirrored": TaskRule("which digit is this", DIGIT_WORDS, mirrored, mirror),
    "spatial": TaskRule("which half has more ink", ("top", "bottom"), spatial),
}
DEFAULT_SEQUENCE = tuple(TASK_RULES)


def statements() -> list[str]:
    """The text-only pre-training stream: plain facts that use every word of the digits."""
    lines = ["the top half has more ink", "the bottom half has more ink"]
    for d, w in enumerate(DIGIT_WORDS):
        even = d % 2 == 0
        lines += [
            f"{w} is {'even' if even else 'odd'}",
            f"is {w} even or odd {'even' if even else 'odd'}",
            f"{w} plus three is {NUMBER_WORDS[d + 3]}",
            f"{w} is {'' if d > 4 else 'not '}greater than four",
            f"is {w} greater than four {'yes' if d > 4 else 'no'}",
            f"which digit is this {w}",
            f"what digit is this {w}",
            f"what is this digit plus three {NUMBER_WORDS[d + 3]}",
            f"draw a {w}",
        ]
    return lines


def words() -> list[str]:
    """Every word the built-in digits use, in a fixed order."""
    texts = [*statements(), CAPTION_QUESTION, DRAW_PROMPT.format("")]
    for rule in TASK_RULES.values():
        texts += [rule.question, *rule.answers]
    return list(dict.fromkeys(w for t in texts for w in t.split()))


def task_samples(
    name: str, pools: Pools, index: np.ndarray, codebook: Codebook, margin: float
) -> list[Sample]:
    """Samples of task ``name`` on the images ``index`` (ambiguous images left out)."""
    rule = TASK_RULES[name]
    images = pools.images[index]
    if rule.transform is not None:
        images = rule.transform(images)
    codes = codebook.encode(images)
    out = []
    for i, img, c, label in zip(index, images, codes, pools.labels[index], strict=True):
        answer = rule.answer(img, int(label), margin)
        if answer is not None:
            out.append(Sample(c, rule.question, answer, int(label), int(i)))
    return out


def builtin_tasks(
    pools: Pools, codebook: Codebook, names: Sequence[str] = DEFAULT_SEQUENCE, margin: float = 0.1
) -> list[Task]:
    """The built-in tasks ``names`` in order; an unknown name lists the valid ones."""
    unknown = [n for n in names if n not in TASK_RULES]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; built-in tasks: {', '.join(TASK_RULES)}")
    return [
        Task(
            name,
            TASK_RULES[name].answers,
            task_samples(name, pools, pools.train, codebook, margin),
            task_samples(name, pools, pools.test, codebook, margin),
        )
        for name in names
    ]


def preview_samples(
    pools: Pools, codebook: Codebook, digits: Sequence[int], margin: float
) -> list[Sample]:
    """Every built-in task's question on pre-training-pool images of ``digits`` only."""
    index = pools.pretrain[np.isin(pools.labels[pools.pretrain], list(digits))]
    if len(index) == 0:
        return []
    return [s for name in TASK_RULES for s in task_samples(name, pools, index, codebook, margin)]
