"""The digits host's token formats, over its word-level :class:`~modecl.digits.vocab.Vocabulary`::

    understand: <bos> <boi> c1..c16 <eoi> question words <sep> | answer words <eos>
    draw:       <bos> draw a seven <sep>                       | <boi> c1..c16 <eoi> <eos>
    text:       <bos>                                          | words <eos>

Labels are ``IGNORE`` everywhere left of the bar, so the loss covers only what follows
the separator (optionally also the image codes of the prompt, for pre-training).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from modecl.core.sequences import IGNORE, DrawPair, Example
from modecl.core.tasks import Sample
from modecl.digits.vocab import Vocabulary


@dataclass(frozen=True)
class DigitsFormat:
    """The digits host's format (module doc), over its :class:`~modecl.digits.vocab.Vocabulary`."""

    vocab: Vocabulary

    @property
    def pad_id(self) -> int:
        return self.vocab.pad_id

    @property
    def eos_id(self) -> int:
        return self.vocab.eos_id

    def prompt(self, sample: Sample) -> list[int]:
        return understand_prompt(self.vocab, sample.codes, sample.question)

    def answer_ids(self, answer: str) -> list[int]:
        return answer_ids(self.vocab, answer)

    def decode(self, ids: Sequence[int]) -> str:
        return self.vocab.decode_words(ids)

    def answer_allowed(self, vocab_size: int) -> None:
        return None

    def draw_example(self, pair: DrawPair) -> Example:
        return draw_example(self.vocab, pair.prompt, pair.codes)

    def is_image_code(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.isin(ids, torch.tensor(self.vocab.image_code_ids, device=ids.device))

    def is_image_token(self, ids: torch.Tensor) -> torch.Tensor:
        return self.vocab.image_mask(ids)


def understand_prompt(vocab: Vocabulary, codes: Sequence[int], question: str) -> list[int]:
    return [vocab.bos_id, *vocab.image_span(codes), *vocab.encode_words(question), vocab.sep_id]


def draw_prompt(vocab: Vocabulary, prompt: str) -> list[int]:
    return [vocab.bos_id, *vocab.encode_words(prompt), vocab.sep_id]


def answer_ids(vocab: Vocabulary, answer: str) -> list[int]:
    return [*vocab.encode_words(answer), vocab.eos_id]


def example(
    vocab: Vocabulary, prompt: list[int], answer: list[int], loss_on_prompt_codes: bool = False
) -> Example:
    """``prompt + answer`` with labels on the answer (and on the prompt's image codes)."""
    if loss_on_prompt_codes:
        codes = set(vocab.image_code_ids)
        prompt_labels = [i if i in codes else IGNORE for i in prompt]
    else:
        prompt_labels = [IGNORE] * len(prompt)
    return Example(prompt + answer, prompt_labels + answer)


def understand_example(
    vocab: Vocabulary, codes: Sequence[int], question: str, answer: str, **kw: bool
) -> Example:
    return example(
        vocab, understand_prompt(vocab, codes, question), answer_ids(vocab, answer), **kw
    )


def draw_example(vocab: Vocabulary, prompt: str, codes: Sequence[int]) -> Example:
    return example(vocab, draw_prompt(vocab, prompt), [*vocab.image_span(codes), vocab.eos_id])


def text_example(vocab: Vocabulary, text: str) -> Example:
    return example(vocab, [vocab.bos_id], answer_ids(vocab, text))
