"""Scoring a generated answer against the reference, by the rules of the paper and of CoIN.

    exact      lower-cased exact match (the paper: TextVQA, GQA, VizWiz)
    choice     the option's letter or its text (ScienceQA); needs the sample's `options`
    contains   the class name anywhere in the answer, as whole words (the paper: ImageNet)
    vqa        VQA soft accuracy over every annotator's answer (CoIN: TextVQA); needs the
               sample's `answers`
    substring  the reference inside the answer or the answer inside the reference (CoIN:
               ImageNet); an empty answer is wrong

Both sides are normalized first: lower-cased, runs of whitespace collapsed to one space,
surrounding whitespace and one trailing period removed. A score is a credit in [0, 1]:
0.0 or 1.0 under every rule but `vqa`.

`vqa` is the official VQA accuracy, as CoIN computes it: with each of the n annotators
left out in turn, min(#matches among the others / 3, 1), averaged over the n. An answer
that m of 10 annotators gave scores 0.3 (m = 1), 0.6 (m = 2), 0.9 (m = 3), 1.0 (m >= 4).
Unlike CoIN (EvalAI's answer processor) it does not strip punctuation and articles or map
number words to digits.

    >>> score("Paris.", "paris", "exact")
    1.0
    >>> score("(b)", "Cat", "choice", options=["dog", "cat"])
    1.0
    >>> score("It is a golden retriever", "golden retriever", "contains")
    1.0
    >>> score("red", "red", "vqa", answers=["red"] * 3 + ["dark red"] * 7)
    0.9
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

__all__ = ["PAPER_RULES", "RULES", "normalize", "paper_rule", "score"]

RULES = ("exact", "choice", "contains", "vqa", "substring")

# The paper's rules for CoIN's tasks, by the task's lower-cased name; any other is `exact`.
PAPER_RULES = {"scienceqa": "choice", "imagenet": "contains"}

# "a", "a.", "a)", "a:", "(a)", optionally followed by the option's text: "(a) paris".
_LETTER = re.compile(r"^(?:\(([a-z])\)|([a-z])(?:[.):](?=\s|$)|$))")


def normalize(text: str) -> str:
    """Lower-case, collapse whitespace, strip it and one trailing period."""
    text = " ".join(text.lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def paper_rule(task: str) -> str:
    """The paper's rule for a task named like one of CoIN's (case-insensitive)."""
    return PAPER_RULES.get(task.lower(), "exact")


def _option_index(text: str, options: Sequence[str]) -> int | None:
    """Which option `text` names, by letter or by the option's text; None for none."""
    match = _LETTER.match(text)
    if match:
        index = string.ascii_lowercase.index(match.group(1) or match.group(2))
        if index < len(options):
            return index
    texts = [normalize(option) for option in options]
    return texts.index(text) if text in texts else None


def score(
    prediction: str,
    answer: str,
    rule: str,
    options: Sequence[str] | None = None,
    answers: Sequence[str] | None = None,
) -> float:
    """The credit in [0, 1] of `prediction` for the reference `answer` under `rule` (`RULES`).

    For `choice`, `answer` may be the option's letter or its text; a prediction naming the
    same option either way is right. `vqa` scores against `answers` (every annotator's).
    """
    if rule not in RULES:
        raise ValueError(f"unknown scoring rule {rule!r}; expected one of {', '.join(RULES)}")
    prediction, answer = normalize(prediction), normalize(answer)
    if rule == "exact":
        return float(prediction == answer)
    if rule == "contains":
        # Whole words: "cat" is not in "category"; lookarounds also work for names like "c++".
        return float(re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", prediction) is not None)
    if rule == "substring":
        return float(bool(prediction) and (answer in prediction or prediction in answer))
    if rule == "vqa":
        if not answers:
            raise ValueError("the vqa rule needs the sample's answers (every annotator's)")
        given = [normalize(a) for a in answers]
        matches = given.count(prediction)
        return sum(min((matches - (g == prediction)) / 3, 1.0) for g in given) / len(given)
    if not options:
        raise ValueError("the choice rule needs the sample's options")
    expected = _option_index(answer, options)
    if expected is None:
        raise ValueError(f"answer {answer!r} is neither an option letter nor one of {options}")
    return float(_option_index(prediction, options) == expected)
