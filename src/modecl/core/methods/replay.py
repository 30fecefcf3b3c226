"""Experience replay: plain LoRA, and a small buffer of earlier tasks' training samples
mixed into every task batch. The buffer holds an equal share of each earlier task."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from modecl.core.config import ContinualSettings, ReplaySettings
from modecl.core.methods.base import LossFn, Method
from modecl.core.sequences import DrawPair, Format
from modecl.core.tasks import Sample, Task


@dataclass
class Rehearsal(Method):
    """A method that keeps earlier tasks' training samples: ``memory`` holds an equal share
    of :meth:`memory_size` from each task seen (its first ones in a seeded order), refilled
    after each task and on resume. Replay mixes them into the batches; A-GEM takes its
    reference gradient from them."""

    seen: dict[str, list[Sample]] = field(default_factory=dict)  # task name -> its samples
    memory: list[Sample] = field(default_factory=list)

    def memory_size(self) -> int:
        """How many samples the memory holds over all earlier tasks."""
        raise NotImplementedError

    def after_task(
        self,
        model: torch.nn.Module,
        task: Task,
        loss_fn: LossFn,
        seed: int,
        fmt: Format | None = None,
    ) -> None:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(task.train))[: self.memory_size()]  # all it can use
        self.seen[task.name] = [task.train[i] for i in order]
        self.refill()

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]
        self.refill()

    def refill(self) -> None:
        """The memory's equal shares of the tasks seen, at the current size."""
        self.memory = equal_shares(self.seen, self.memory_size())


@dataclass
class Replay(Rehearsal):
    settings: ReplaySettings = field(default_factory=ReplaySettings)

    def memory_size(self) -> int:
        return self.settings.buffer_size

    def configure(self, settings: ContinualSettings, pairs: Sequence[DrawPair] = ()) -> None:
        self.settings = settings.replay
        self.refill()

    def mix(self, batch: list[Sample], rng: np.random.Generator) -> list[Sample]:
        per_batch = self.settings.per_batch
        if not self.memory or per_batch == 0:
            return batch
        take = rng.choice(len(self.memory), min(per_batch, len(self.memory)), replace=False)
        return batch + [self.memory[i] for i in take]


def equal_shares(seen: dict[str, list[Sample]], size: int) -> list[Sample]:
    """``size`` samples, an equal share from each task seen so far (its first ones)."""
    share = size // max(len(seen), 1)
    return [s for samples in seen.values() for s in samples[:share]]


METHOD = Replay("replay", kind="lora")
