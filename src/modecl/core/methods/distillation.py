"""Distillation from the frozen host, as a method's loss term (MoDE, LwF and the ablations).

Beside each task batch, a batch of image-generation pairs runs twice: through the teacher
(the same model with adapters off, in eval mode so that the host's own dropout never makes
the target random) and through the student (adapters on, a ``student`` pass). The term is
``topk_kl`` over the predictions of the image tokens (:mod:`modecl.core.distill`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from modecl.core.adapters import lm_logits, pass_kind
from modecl.core.config import ConfigError, ContinualSettings, DistillSettings
from modecl.core.distill import kd_mask, topk_kl
from modecl.core.methods.base import Method
from modecl.core.processes import Processes
from modecl.core.sequences import DrawPair, Format, collate


def teacher_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The frozen host's logits: adapters off, dropout off, no graph; the mode is restored."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), pass_kind(model, "teacher"):
            return lm_logits(model, **inputs)
    finally:
        model.train(training)


def distill_loss(
    model: nn.Module, fmt: Format, pairs: Sequence[DrawPair], settings: DistillSettings
) -> torch.Tensor:
    """Top-K KL(teacher || student) over a batch of image-generation pairs."""
    batch = collate([fmt.draw_example(p) for p in pairs], fmt.pad_id)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    teacher = teacher_logits(model, inputs)
    with pass_kind(model, "student"):
        student = lm_logits(model, **inputs)
    # Logits at t predict token t+1: distil the predictions of the image tokens.
    next_is_image = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    next_is_image[:, :-1] = fmt.is_image_token(batch["input_ids"][:, 1:])
    mask = kd_mask(next_is_image, batch["attention_mask"], average_over=settings.average_over)
    return topk_kl(
        teacher,
        student,
        mask,
        temperature=settings.temperature,
        top_k=settings.top_k,
        chunk_size=settings.chunk_size,
    )


@dataclass
class Distilling(Method):
    """A method with the distillation term (``kd``) beside its task loss."""

    settings: DistillSettings = field(default_factory=DistillSettings)
    pairs: Sequence[DrawPair] = ()

    @property
    def needs_pairs(self) -> bool:
        return True

    def configure(self, settings: ContinualSettings, pairs: Sequence[DrawPair] = ()) -> None:
        self.settings, self.pairs = settings.distill, pairs  # enough: a front door's check_pairs

    def step_inputs(self, rng: np.random.Generator, processes: Processes) -> list[DrawPair]:
        pick = rng.choice(len(self.pairs), self.settings.batch_size, replace=False)
        return [self.pairs[i] for i in processes.share(pick)]

    def loss_terms(
        self, model: nn.Module, fmt: Format, inputs: list[DrawPair]
    ) -> dict[str, tuple[torch.Tensor, float]]:
        return {"kd": (distill_loss(model, fmt, inputs, self.settings), self.settings.weight)}


def check_pairs(method: str, available: int, batch_size: int, tests: int = 0) -> None:
    """Refuse (a ConfigError, in a front door's pre-flight) ``available`` train pairs that
    do not fill a distillation batch of ``batch_size``; ``tests``: the test pairs given
    beside them, named in the message."""
    if available == 0 and tests:
        raise ConfigError(
            f"method '{method}' distils from train pairs, but all {tests} pairs given are "
            'split "test" (they only evaluate image generation): give pairs of split "train"'
        )
    if available == 0:
        raise ConfigError(f"method '{method}' distils but no image-generation pairs were given")
    if available < batch_size:
        raise ConfigError(
            f"method '{method}' distils {batch_size} pairs per step "
            f"(continual.distill.batch_size) but only {available} training pairs were given: "
            "give more pairs or lower continual.distill.batch_size"
        )
