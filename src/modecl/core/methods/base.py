"""What a continual-learning method is: an adapter configuration plus a training recipe.

The one training loop (:mod:`modecl.core.train`) calls these hooks; a method overrides only
what it changes. Adding a method means one module and one line in the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from modecl.core.adapters import AdapterConfig
from modecl.core.config import ContinualSettings
from modecl.core.tasks import Sample, Task

# (model, samples) -> mean task loss over those samples, with the graph (for Fisher estimates)
LossFn = Callable[[torch.nn.Module, Sequence[Sample]], torch.Tensor]


@dataclass
class Method:
    """A named strategy: adapter ``kind`` under a routing ``policy``, optionally distilling."""

    name: str
    kind: str = "lora"
    policy: str = "token"
    distill: bool = False

    def adapter_config(self, settings: ContinualSettings) -> AdapterConfig:
        a = settings.adapter
        return AdapterConfig(
            kind=self.kind,
            rank=a.rank,
            alpha=a.alpha,
            dropout=a.dropout,
            num_experts=a.num_experts,
            target_modules=tuple(a.target_modules),
            routing=self.policy,
        )

    def setup(self, settings: ContinualSettings) -> None:
        """Called once before the first task."""

    def mix(self, batch: list[Sample], rng: np.random.Generator) -> list[Sample]:
        """The samples actually trained on for one task batch (replay adds old ones)."""
        return batch

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """An extra loss term (EWC), or None."""
        return None

    def after_task(self, model: torch.nn.Module, task: Task, loss_fn: LossFn, seed: int) -> None:
        """Called after training each task (replay fills its buffer, EWC its Fisher)."""

    def state_dict(self) -> dict:
        """What must survive a resume besides the adapters (buffers, Fisher, anchors)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
