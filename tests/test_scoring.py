"""Scoring rules on hand-written cases."""

from __future__ import annotations

from typing import get_args

import pytest

from modecl.core.scoring import RULES, normalize, paper_rule, score, vqa_normalize
from modecl.hosts.config import Rule

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
    assert score(prediction, answer, "exact") == float(right)


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
    assert score(prediction, answer, "choice", options=OPTIONS) == float(right)


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
    assert score(prediction, answer, "contains") == float(right)


@pytest.mark.parametrize(
    ("prediction", "answer", "right"),
    [
        ("a tabby cat", "cat", True),  # the reference in the prediction
        ("cat", "tabby cat", True),  # the prediction in the reference
        ("Golden Retriever.", "golden retriever", True),
        ("a category of animal", "cat", True),  # not whole words, unlike `contains`
        ("dog", "cat", False),
        ("cats and dogs", "hot dog", False),
        ("", "cat", False),  # an empty answer is in every reference: wrong all the same
        (" . ", "cat", False),
    ],
)
def test_substring(prediction, answer, right):
    assert score(prediction, answer, "substring") == float(right)


TEN = ["red"] * 4 + ["dark red"] * 3 + ["maroon"] * 2 + ["Red."]  # "red" 5 times normalized


@pytest.mark.parametrize("rule", ["vqa", "vqa-raw"])
@pytest.mark.parametrize(
    ("prediction", "answers", "credit"),
    [
        ("red", TEN, 1.0),  # 5 of 10: at least 3 among any 9
        ("dark red", TEN, 0.9),  # 3 of 10: (3 x 2/3 + 7 x 3/3) / 10
        ("maroon", TEN, 0.6),  # 2 of 10: (2 x 1/3 + 8 x 2/3) / 10
        ("pink", TEN, 0.0),
        ("blue", ["blue"] + ["green"] * 9, 0.3),  # 1 of 10: (0 + 9 x 1/3) / 10
        ("Dark  Red", TEN, 0.9),  # normalized
        ("green", ["green"] * 3, 2 / 3),  # every one left out leaves 2 matches
        ("green", ["green"], 0.0),  # one annotator: none left to agree
    ],
)
def test_vqa_soft_accuracy(rule, prediction, answers, credit):
    assert score(prediction, "unused", rule, answers=answers) == pytest.approx(credit)


@pytest.mark.parametrize(
    ("text", "processed"),
    [
        # 1. lower-case; commas and question marks dropped; "'s" split off; whitespace
        ("Yes?", "yes"),
        ("Red, White", "red white"),
        ("Man's hat", "man 's hat"),
        ("left\n\tside", "left side"),
        # 2. punctuation: deleted where it stands next to a space, else a space
        ("black/white", "black white"),
        ("x-ray vision - yes", "xray vision yes"),  # "- " occurs: every "-" is deleted
        ("(left)", "left"),
        ("wow!", "wow"),
        ("1,000", "1000"),
        # periods: deleted unless a digit follows
        ("e.g.", "eg"),
        ("St. Louis.", "st louis"),
        ("3.5", "3.5"),
        # 3. number words to digits, articles dropped, contractions given their apostrophe
        ("Two", "2"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # zero..ten only
        ("the red one", "red 1"),
        ("An apple", "apple"),
        ("a", ""),
        ("dont know", "don't know"),
        ("isnt", "isn't"),
        ("Im", "im"),  # the published upper-case key is never met: lower-cased first
        ("somebody'd", "somebodyd"),  # as published: backwards
    ],
)
def test_vqa_normalize_processes_answers_as_the_vqa_evaluator(text, processed):
    assert vqa_normalize(text) == processed


@pytest.mark.parametrize(
    ("prediction", "answers", "vqa", "raw"),
    [
        ("Two dogs", ["2 dogs"] * 4 + ["cats"] * 6, 1.0, 0.0),  # number word
        ("red", ["the red"] * 2 + ["red"] + ["blue"] * 7, 0.9, 0.3),  # article
        ("dont know", ["don't know"] * 3 + ["no"] * 7, 0.9, 0.0),  # contraction
        ("black-white", ["black white"] * 4 + ["gray"] * 6, 1.0, 0.0),  # punctuation
        ("yes", ["yes"] * 4 + ["no"] * 6, 1.0, 1.0),  # nothing to process
    ],
)
def test_vqa_scores_processed_answers_and_vqa_raw_the_former_way(prediction, answers, vqa, raw):
    assert score(prediction, "unused", "vqa", answers=answers) == pytest.approx(vqa)
    assert score(prediction, "unused", "vqa-raw", answers=answers) == pytest.approx(raw)


@pytest.mark.parametrize(
    ("task", "rule"),
    [
        ("ScienceQA", "choice"),
        ("scienceqa", "choice"),
        ("ImageNet", "contains"),
        ("IMAGENET", "contains"),
        ("TextVQA", "exact"),
        ("GQA", "exact"),
        ("VizWiz", "exact"),
        ("Grounding", "exact"),
        ("ScienceQA-2", "exact"),  # the name, not a part of it
    ],
)
def test_the_papers_rule_by_task_name(task, rule):
    assert paper_rule(task) == rule


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_gives_a_float_credit(rule):
    credit = score("venus", "B", rule, options=OPTIONS, answers=["venus"] * 3)
    assert type(credit) is float and 0.0 <= credit <= 1.0


def test_the_config_accepts_exactly_the_rules():
    assert get_args(Rule) == RULES


def test_errors_name_the_valid_rules_and_what_a_rule_misses():
    with pytest.raises(ValueError, match="exact, choice, contains, vqa, vqa-raw, substring"):
        score("a", "a", "fuzzy")
    with pytest.raises(ValueError, match="the vqa rule needs the sample's answers"):
        score("red", "red", "vqa")
    with pytest.raises(ValueError, match="options"):
        score("A", "A", "choice")
    with pytest.raises(ValueError, match="neither an option letter"):
        score("A", "Pluto", "choice", options=OPTIONS)
