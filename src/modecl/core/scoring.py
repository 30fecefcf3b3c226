"""Scoring a generated answer against the reference, by the rules of the paper and of CoIN.

    exact      lower-cased exact match (the paper: TextVQA, GQA, VizWiz)
    choice     the option's letter or its text (ScienceQA); needs the sample's `options`
    contains   the class name anywhere in the answer, as whole words (the paper: ImageNet)
    vqa        VQA soft accuracy over every annotator's answer, each answer processed as the
               official VQA evaluator does (CoIN: TextVQA); needs the sample's `answers`
    vqa-raw    the same accuracy over answers normalized as every other rule (below) only
    substring  the reference inside the answer or the answer inside the reference (CoIN:
               ImageNet); an empty answer is wrong

Both sides are normalized first: lower-cased, runs of whitespace collapsed to one space,
surrounding whitespace and one trailing period removed. A score is a credit in [0, 1]:
0.0 or 1.0 under every rule but `vqa` and `vqa-raw`.

`vqa` is the official VQA accuracy as CoIN computes it (its TextVQA evaluator, m4c's
`TextVQAAccuracyEvaluator`): every answer, the prediction's and each annotator's, goes
through EvalAI's answer processor (:func:`vqa_normalize`: punctuation, number words to
digits, articles, contractions); then, with each of the n annotators left out in turn,
min(#matches among the others / 3, 1), averaged over the n. An answer that m of 10
annotators gave scores 0.3 (m = 1), 0.6 (m = 2), 0.9 (m = 3), 1.0 (m >= 4).

    >>> score("Paris.", "paris", "exact")
    1.0
    >>> score("(b)", "Cat", "choice", options=["dog", "cat"])
    1.0
    >>> score("It is a golden retriever", "golden retriever", "contains")
    1.0
    >>> score("red", "red", "vqa", answers=["red"] * 3 + ["dark red"] * 7)
    0.9
    >>> score("Two dogs!", "unused", "vqa", answers=["2 dogs"] * 4)
    1.0
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Literal, get_args

__all__ = ["PAPER_RULES", "RULES", "Rule", "normalize", "paper_rule", "score", "vqa_normalize"]

Rule = Literal["exact", "choice", "contains", "vqa", "vqa-raw", "substring"]
RULES: tuple[str, ...] = get_args(Rule)

# The paper's rules for CoIN's tasks, by the task's lower-cased name; any other is `exact`.
PAPER_RULES = {"scienceqa": "choice", "imagenet": "contains"}

# "a", "a.", "a)", "a:", "(a)", optionally followed by the option's text: "(a) paris".
_LETTER = re.compile(r"^(?:\(([a-z])\)|([a-z])(?:[.):](?=\s|$)|$))")


# EvalAI's answer processor (the official VQA evaluator's, as m4c and CoIN copy it).
_CONTRACTIONS = {
    **{
        w.replace("'", ""): w
        for w in (  # noqa: SIM905
            "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd "
            "he's how'd how'll how's isn't it'd it'll ma'am mightn't might've mustn't must've "
            "needn't o'clock oughtn't shan't should've shouldn't somebody'll somebody's "
            "someone'd someone'll someone's something'd something'll that's there'd there're "
            "there's they'd they'll they're they've wasn't we've weren't what'll what're what's "
            "what've when's where'd where's where've who'd who'll who's who've why'll why're "
            "why's won't would've wouldn't y'all you'd you'll you're you've"
        ).split()
    },
    **{
        a: b
        for b, forms in {
            "couldn't've": "couldnt've couldn'tve",
            "hadn't've": "hadnt've hadn'tve",
            "he'd've": "hed've he'dve",
            "I'd've": "Id've I'dve",
            "it'd've": "itd've it'dve",
            "mightn't've": "mightnt've mightn'tve",
            "'ow's'at": "ow's'at 'ows'at 'ow'sat",
            "she'd've": "shed've she'dve",
            "shouldn't've": "shouldnt've shouldn'tve",
            "somebody'd've": "somebodyd've somebody'dve",
            "someone'd've": "someoned've someone'dve",
            "something'd've": "somethingd've something'dve",
            "there'd've": "thered've there'dve",
            "they'd've": "theyd've they'dve",
            "we'd've": "wed've we'dve",
            "who'd've": "whod've who'dve",
            "wouldn't've": "wouldnt've wouldn'tve",
            "y'all'll": "yall'll y'allll",
            "y'all'd've": "yall'd've y'alld've y'all'dve",
            "you'd've": "youd've you'dve",
        }.items()
        for a in forms.split()
    },
    # as published: an upper-case key (never met: the text is lower-cased first), keys
    # that are their own values, and one mapping backwards
    "Im": "I'm",
    "Ive": "I've",
    "let's": "let's",
    "she's": "she's",
    "notve": "not've",
    "twas": "'twas",
    "somebody'd": "somebodyd",
}
_NUMBERS = {"none": "0"} | {
    w: str(i)
    for i, w in enumerate("zero one two three four five six seven eight nine ten".split())  # noqa: SIM905
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = ';/[]"{}()=+\\_->' + "<@`,?!"
# As published, "(?!<=\d)" where "(?<!\d)" was meant: every period not before a digit.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")


def vqa_normalize(text: str) -> str:
    """An answer as EvalAI's answer processor leaves it, the official VQA evaluator's rules:

    1. lower-case; drop commas and question marks; "'s" -> " 's"; newlines and tabs to
       spaces; strip;
    2. punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: each mark is deleted
       where it stands next to a space somewhere in the text (or the text has a comma
       between digits), else replaced by a space; then every period not followed by a
       digit is deleted (at most 32, as published);
    3. words: number words zero..ten (and "none") to digits, the articles a, an, the
       dropped, contractions written without their apostrophe given it back
       ("dont" -> "don't"); words joined by single spaces.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for mark in _PUNCTUATION:
        spaced = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if spaced or _DIGIT_COMMA.search(text) else " ")
    out = _PERIOD.sub("", out, count=32)  # the published call passes re.UNICODE (32) as count
    words = [_NUMBERS.get(w, w) for w in out.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


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
    if rule in ("vqa", "vqa-raw"):
        if not answers:
            raise ValueError(f"the {rule} rule needs the sample's answers (every annotator's)")
        process = vqa_normalize if rule == "vqa" else normalize
        prediction, given = process(prediction), [process(a) for a in answers]
        matches = given.count(prediction)
        return sum(min((matches - (g == prediction)) / 3, 1.0) for g in given) / len(given)
    if not options:
        raise ValueError("the choice rule needs the sample's options")
    expected = _option_index(answer, options)
    if expected is None:
        raise ValueError(f"answer {answer!r} is neither an option letter nor one of {options}")
    return float(_option_index(prediction, options) == expected)
