"""Experience replay: plain LoRA, and a small buffer of earlier tasks' training samples
mixed into every task batch. The buffer holds an equal share of each earlier task."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from modecl.core.config import ContinualSettings
from modecl.core.methods.base import LossFn, Method
from modecl.core.tasks import Sample, Task


@dataclass
class Replay(Method):
    buffer_size: int = 100
    per_batch: int = 8
    seen: dict[str, list[Sample]] = field(default_factory=dict)  # task name -> its samples
    buffer: list[Sample] = field(default_factory=list)

    def setup(self, settings: ContinualSettings) -> None:
        self.buffer_size = settings.replay.buffer_size
        self.per_batch = settings.replay.per_batch

    def mix(self, batch: list[Sample], rng: np.random.Generator) -> list[Sample]:
        if not self.buffer or self.per_batch == 0:
            return batch
        take = rng.choice(len(self.buffer), min(self.per_batch, len(self.buffer)), replace=False)
        return batch + [self.buffer[i] for i in take]

    def after_task(self, model: torch.nn.Module, task: Task, loss_fn: LossFn, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.seen[task.name] = [task.train[i] for i in rng.permutation(len(task.train))]
        self._fill_buffer()

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]
        self._fill_buffer()

    def _fill_buffer(self) -> None:
        """An equal share of the buffer for every task seen so far."""
        share = self.buffer_size // max(len(self.seen), 1)
        self.buffer = [s for samples in self.seen.values() for s in samples[:share]]


METHOD = Replay("replay", kind="lora")
