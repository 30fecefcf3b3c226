r"""A-GEM (Chaudhry et al., ICLR 2019): plain LoRA, an episodic memory of earlier tasks, and
each step's gradient projected when it conflicts with the memory's.

The memory holds an equal share of ``memory_size`` samples for every earlier task (filled
as replay's buffer). At each step a reference batch of ``batch_size`` memory samples gives
the reference gradient g_ref (the mean task loss's); the step's gradient g (the global
batch's, after the data-parallel reduction) is replaced by

    g - (g . g_ref / g_ref . g_ref) g_ref    where g . g_ref < 0

(over all adapter parameters together), else kept. Under several processes the reference
batch is drawn alike in every process and each computes g_ref on the whole of it, so every
process projects the same g alike, without communication. DeepSpeed clips and steps inside
its backward, leaving no gradient to project: A-GEM is refused there (``check_engine``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from modecl.core.config import AGEMSettings, ContinualSettings
from modecl.core.methods.base import LossFn
from modecl.core.methods.replay import Rehearsal
from modecl.core.processes import Processes
from modecl.core.sequences import DrawPair
from modecl.core.tasks import Sample


def project(grad: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A-GEM's projection of the flat gradient ``grad`` against ``reference``: (the
    gradient to step with, whether it was projected)."""
    dot = torch.dot(grad, reference)
    if dot >= 0:
        return grad, False
    return grad - dot / torch.dot(reference, reference) * reference, True


@dataclass
class AGEM(Rehearsal):
    settings: AGEMSettings = field(default_factory=AGEMSettings)

    def memory_size(self) -> int:
        return self.settings.memory_size

    @property
    def edits_gradients(self) -> bool:
        return True

    def configure(self, settings: ContinualSettings, pairs: Sequence[DrawPair] = ()) -> None:
        self.settings = settings.a_gem
        self.refill()

    def step_inputs(self, rng: np.random.Generator, processes: Processes) -> list[Sample]:
        """The reference batch, the same in every process (not cut to a share)."""
        if not self.memory:
            return []
        take = rng.choice(len(self.memory), min(self.settings.batch_size, len(self.memory)), False)
        return [self.memory[i] for i in take]

    def edit_gradients(
        self,
        model: torch.nn.Module,
        params: list[torch.nn.Parameter],
        inputs: list[Sample],
        loss_fn: LossFn,
    ) -> dict[str, float]:
        if not inputs:
            return {}
        reference = torch.autograd.grad(loss_fn(model, inputs), params, allow_unused=True)
        grad = torch.cat([_flat(p, p.grad) for p in params])
        ref = torch.cat([_flat(p, r) for p, r in zip(params, reference, strict=True)])
        step, projected = project(grad, ref)
        if projected:
            for p, value in zip(params, step.split([p.numel() for p in params]), strict=True):
                p.grad = value.view_as(p).clone()
        return {"projected": float(projected)}


def _flat(param: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    return (torch.zeros_like(param) if grad is None else grad).flatten()


METHOD = AGEM("a-gem", kind="lora")
