"""EWC on the adapter parameters: plain LoRA plus the penalty

    weight / 2 * sum_i F_i (theta_i - theta*_i)^2

with F the diagonal (empirical) Fisher estimated after each task from squared gradients
of the task loss, summed over tasks (online EWC), and theta* the adapters after the last
task."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from modecl.core.config import ContinualSettings, EWCSettings
from modecl.core.methods.base import LossFn, Method
from modecl.core.sequences import DrawPair, Format
from modecl.core.tasks import Task


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@dataclass
class EWC(Method):
    settings: EWCSettings = field(default_factory=EWCSettings)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    anchor: dict[str, torch.Tensor] = field(default_factory=dict)

    def configure(self, settings: ContinualSettings, pairs: Sequence[DrawPair] = ()) -> None:
        self.settings = settings.ewc

    def loss_terms(
        self, model: torch.nn.Module, fmt: Format, inputs: Any
    ) -> dict[str, tuple[torch.Tensor, float]]:
        if not self.fisher:
            return {}
        params = trainable(model)
        total = sum((self.fisher[n] * (params[n] - self.anchor[n]) ** 2).sum() for n in self.fisher)
        return {"ewc": (0.5 * total, self.settings.weight)}

    def after_task(
        self,
        model: torch.nn.Module,
        task: Task,
        loss_fn: LossFn,
        seed: int,
        fmt: Format | None = None,
    ) -> None:
        params = trainable(model)
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        order = np.random.default_rng(seed).permutation(len(task.train))
        size, count = self.settings.fisher_batch_size, self.settings.fisher_batches
        batches = [order[i : i + size] for i in range(0, len(order), size)][:count]
        for index in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, [task.train[i] for i in index]).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach() ** 2 / len(batches)
        model.zero_grad(set_to_none=True)
        for n, f in fisher.items():
            self.fisher[n] = self.fisher.get(n, torch.zeros_like(f)) + f
        self.anchor = {n: p.detach().clone() for n, p in params.items()}

    def state_dict(self) -> dict:
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        self.fisher, self.anchor = state["fisher"], state["anchor"]


METHOD = EWC("ewc", kind="lora")
