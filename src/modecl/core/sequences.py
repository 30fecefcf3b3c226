"""Token sequences: every training sample is a prompt and an answer, the loss on the answer.

A :class:`Format` is what the training loop and the evaluation need from a host's token
format: :class:`modecl.digits.format.DigitsFormat` is the embedded host's,
:class:`modecl.hosts.tasks.HostFormat` that of a transformers Chameleon / Emu3 host.
Labels are ``IGNORE`` on the prompt, so the loss covers only the answer.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from modecl.core.tasks import Sample

IGNORE = -100  # label value that the loss skips


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class DrawPair:
    """An image-generation pair: text prompt -> image codes (distillation stream, NLL)."""

    prompt: str
    codes: Sequence[int] | np.ndarray


class Format(Protocol):
    """A host's token format, as the training loop and the evaluation use it."""

    pad_id: int
    eos_id: int

    def prompt(self, sample: Sample) -> list[int]:
        """The understand prompt: image and question, up to where the answer starts."""

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's tokens, closed by the end of sequence."""

    def decode(self, ids: Sequence[int]) -> str:
        """Generated answer tokens back to text (up to the end of sequence)."""

    def answer_allowed(self, vocab_size: int) -> torch.Tensor | None:
        """Bool ``[vocab_size]``: the ids an answer token may take (None: every id)."""

    def draw_example(self, pair: DrawPair) -> Example:
        """Caption, then the image span; labels on the span (and what closes it)."""

    def is_image_code(self, ids: torch.Tensor) -> torch.Tensor:
        """True where an id is one of the host's image codes (not a marker, not text)."""

    def is_image_token(self, ids: torch.Tensor) -> torch.Tensor:
        """True where a token's modality is image: a code or an image-span marker."""


def understand(fmt: Format, sample: Sample) -> Example:
    """An understand sample as a training example: labels on the answer only."""
    prompt, answer = fmt.prompt(sample), fmt.answer_ids(sample.answer)
    return Example(prompt + answer, [IGNORE] * len(prompt) + answer)


def example_lengths(fmt: Format, samples: Sequence[Sample]) -> np.ndarray:
    """The token count of each sample's understand example: the format's own count where
    it has one (``fmt.lengths(samples)``, in bulk), else each example built."""
    count = getattr(fmt, "lengths", None)
    if count is not None:
        return np.asarray(count(samples), dtype=np.int64)
    return np.array([len(understand(fmt, s).input_ids) for s in samples], dtype=np.int64)


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


def left_padded(
    prompts: Sequence[list[int]],
    pad_id: int,
    batch_size: int,
    group: Sequence[Hashable] | None = None,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """Batches for generation: (indices, left-padded ids, attention mask or None if unpadded).

    Prompts are batched by length, so little is padded; ``group`` (one key per prompt)
    keeps prompts of different keys in different batches.
    """
    keys = group if group is not None else [None] * len(prompts)
    members: dict[Hashable, list[int]] = {}
    for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
        members.setdefault(keys[i], []).append(i)
    for index in members.values():
        for start in range(0, len(index), batch_size):
            chunk = index[start : start + batch_size]
            longest = max(len(prompts[i]) for i in chunk)
            pads = [longest - len(prompts[i]) for i in chunk]
            ids = torch.tensor([[pad_id] * (longest - len(prompts[i])) + prompts[i] for i in chunk])
            mask = torch.tensor([[0] * n + [1] * (longest - n) for n in pads])
            yield chunk, ids, None if not any(pads) else mask


def padding_inputs(mask: torch.Tensor | None, new: int) -> dict[str, torch.Tensor]:
    """Forward inputs for the last ``new`` tokens of left-padded rows, ``mask`` covering every
    token so far: the mask, and positions that count real tokens only ({} when unpadded)."""
    if mask is None:
        return {}
    return {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)[:, -new:]}


def grow_mask(mask: torch.Tensor | None, new: int) -> torch.Tensor | None:
    """``mask`` extended by ``new`` real tokens (None stays None: nothing is padded)."""
    return None if mask is None else torch.cat([mask, mask.new_ones(len(mask), new)], dim=1)


def next_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, normalizer: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of position t's logits against label t+1, skipping ``IGNORE``.

    The mean over labelled tokens, or their sum divided by ``normalizer`` (data-parallel
    training divides by the token count of the whole global batch).
    """
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE,
        reduction="mean" if normalizer is None else "sum",
    )
    return loss if normalizer is None else loss / normalizer
