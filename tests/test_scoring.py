"""Scoring rules on hand-written cases."""

from __future__ import annotations

import pytest

from modecl.core.scoring import RULES, normalize, score

OPTIONS = ["Mercury", "Venus", "Earth", "Mars"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Paris. ", "paris"),
        ("New\t York\n", "new york"),
        ("St. Louis.", "st. louis"),
        ("etc..", "etc."),  # one trailing period only
        ("", ""),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "right"),
    [
        ("Paris", "paris", True),
        (" PARIS.\n", "Paris", True),
        ("paris, france", "paris", False),
        ("pari", "paris", False),
        ("two", "2", False),
        ("", "paris", False),
    ],
)
def test_exact(prediction, answer, right):
    assert score(prediction, answer, "exact") is right


@pytest.mark.parametrize(
    ("prediction", "answer", "right"),
    [
        ("B", "B", True),
        ("(b)", "B", True),
        ("b.", "B", True),
        ("b)", "B", True),
        ("(B) Venus", "B", True),
        ("venus", "B", True),
        ("Venus.", "venus", True),
        ("B", "Venus", True),
        ("A", "B", False),
        ("(c)", "Venus", False),
        ("earth", "B", False),
        ("E", "B", False),  # no fifth option
        ("b venus", "B", False),  # a letter needs its parenthesis or punctuation
        ("the answer is venus", "B", False),
    ],
)
def test_choice(prediction, answer, right):
    assert score(prediction, answer, "choice", options=OPTIONS) is right


@pytest.mark.parametrize(
    ("prediction", "answer", "right"),
    [
        ("This is a golden retriever.", "golden retriever", True),
        ("GOLDEN RETRIEVER", "Golden Retriever", True),
        ("a golden  retriever dog", "golden retriever", True),
        ("a tabby cat", "cat", True),
        ("cat", "cat", True),
        ("a category of animal", "cat", False),
        ("a bobcat", "cat", False),
        ("a golden dog", "golden retriever", False),
        ("written in c++ code", "c++", True),
    ],
)
def test_contains(prediction, answer, right):
    assert score(prediction, answer, "contains") is right


def test_errors_name_the_valid_rules_and_the_missing_options():
    with pytest.raises(ValueError, match="exact, choice, contains"):
        score("a", "a", "fuzzy")
    assert RULES == ("exact", "choice", "contains")
    with pytest.raises(ValueError, match="options"):
        score("A", "A", "choice")
    with pytest.raises(ValueError, match="neither an option letter"):
        score("A", "Pluto", "choice", options=OPTIONS)
