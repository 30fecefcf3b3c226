"""Experience replay: plain LoRA, and a small buffer of earlier tasks' training samples
mixed into every task batch. The buffer holds an equal share of each earlier task."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from modecl.core.methods.base import LossFn, Method
from modecl.core.sequences import DrawPair
from modecl.core.tasks import Sample, Task
from modecl.core.values import Size

if TYPE_CHECKING:
    from modecl.core.config import ContinualSettings


@dataclass
class ReplaySettings:
    buffer_size: Size = 100  # samples kept over all earlier tasks, equal share per task
    per_batch: Size = 8  # buffer samples mixed into each task batch


@dataclass
class Replay(Method):
    settings: ReplaySettings = field(default_factory=ReplaySettings)
    seen: dict[str, list[Sample]] = field(default_factory=dict)  # task name -> its samples
    buffer: list[Sample] = field(default_factory=list)

    def configure(self, settings: ContinualSettings, pairs: Sequence[DrawPair] = ()) -> None:
        self.settings = settings.replay
        self._fill_buffer()

    def mix(self, batch: list[Sample], rng: np.random.Generator) -> list[Sample]:
        per_batch = self.settings.per_batch
        if not self.buffer or per_batch == 0:
            return batch
        take = rng.choice(len(self.buffer), min(per_batch, len(self.buffer)), replace=False)
        return batch + [self.buffer[i] for i in take]

    def after_task(self, model: torch.nn.Module, task: Task, loss_fn: LossFn, seed: int) -> None:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(task.train))[: self.settings.buffer_size]  # all it can use
        self.seen[task.name] = [task.train[i] for i in order]
        self._fill_buffer()

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]
        self._fill_buffer()

    def _fill_buffer(self) -> None:
        """An equal share of the buffer for every task seen so far."""
        share = self.settings.buffer_size // max(len(self.seen), 1)
        self.buffer = [s for samples in self.seen.values() for s in samples[:share]]


METHOD = Replay("replay", kind="lora")
