"""Token sequences: every training sample is ``prompt SEP answer`` with the loss on the answer.

Formats (ids from :class:`~modecl.vocab.Vocabulary`)::

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

from modecl.vocab import IGNORE, Vocabulary


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


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


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``, ``labels``, ``attention_mask``."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position t's logits against label t+1, skipping ``IGNORE``."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE
    )
