"""Scoring a generated answer against the reference, by the rules of CoIN and the paper.

    exact     lower-cased exact match (TextVQA, GQA, VizWiz)
    choice    the option's letter or its text (ScienceQA); needs the sample's `options`
    contains  the class name anywhere in the answer, as whole words (ImageNet)

Both sides are normalized first: lower-cased, runs of whitespace collapsed to one space,
surrounding whitespace and one trailing period removed.

    >>> score("Paris.", "paris", "exact")
    True
    >>> score("(b)", "Cat", "choice", options=["dog", "cat"])
    True
    >>> score("It is a golden retriever", "golden retriever", "contains")
    True
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

__all__ = ["RULES", "normalize", "score"]

RULES = ("exact", "choice", "contains")

# "a", "a.", "a)", "a:", "(a)", optionally followed by the option's text: "(a) paris".
_LETTER = re.compile(r"^(?:\(([a-z])\)|([a-z])(?:[.):](?=\s|$)|$))")


def normalize(text: str) -> str:
    """Lower-case, collapse whitespace, strip it and one trailing period."""
    text = " ".join(text.lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def _option_index(text: str, options: Sequence[str]) -> int | None:
    """Which option `text` names, by letter or by the option's text; None for none."""
    match = _LETTER.match(text)
    if match:
        index = string.ascii_lowercase.index(match.group(1) or match.group(2))
        if index < len(options):
            return index
    texts = [normalize(option) for option in options]
    return texts.index(text) if text in texts else None


def score(prediction: str, answer: str, rule: str, options: Sequence[str] | None = None) -> bool:
    """Whether `prediction` is right for the reference `answer` under `rule` (`RULES`).

    For `choice`, `answer` may be the option's letter or its text; a prediction naming the
    same option either way is right.
    """
    if rule not in RULES:
        raise ValueError(f"unknown scoring rule {rule!r}; expected one of {', '.join(RULES)}")
    prediction, answer = normalize(prediction), normalize(answer)
    if rule == "exact":
        return prediction == answer
    if rule == "contains":
        # Whole words: "cat" is not in "category"; lookarounds also work for names like "c++".
        return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", prediction) is not None
    if not options:
        raise ValueError("the choice rule needs the sample's options")
    expected = _option_index(answer, options)
    if expected is None:
        raise ValueError(f"answer {answer!r} is neither an option letter nor one of {options}")
    return _option_index(prediction, options) == expected
