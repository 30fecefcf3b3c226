"""What a continual-learning method is: an adapter configuration plus a training recipe.

The one training loop (:mod:`modecl.core.train`) calls these hooks; a method overrides only
what it changes. Each step's loss is the task CE plus the method's named loss terms
(:meth:`Method.loss_terms`: distillation, EWC's penalty, O-LoRA's orthogonality); a method
may then edit the step's gradient (:meth:`Method.edit_gradients`: A-GEM's projection).
The task in training is known to the adapters (``routing_context(model).task``, set by the
loop); the sequence's length to :meth:`Method.adapter_config`. A method's settings are a
section of ``ContinualSettings`` (:mod:`modecl.core.config`, e.g. ``ReplaySettings``), which
imports no method. Adding a method: one module defining ``METHOD``, and one line in the
registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modecl.core.adapters import TASK_KINDS, AdapterConfig
from modecl.core.config import ContinualSettings
from modecl.core.processes import Processes
from modecl.core.sequences import DrawPair, Format
from modecl.core.tasks import Sample, Task

# (model, samples) -> mean task loss over those samples, with the graph (for Fisher estimates)
LossFn = Callable[[torch.nn.Module, Sequence[Sample]], torch.Tensor]


@dataclass
class Method:
    """A named strategy: adapter ``kind`` under a routing ``policy``, plus its recipe hooks.

    ``expert_rank``, when set, is this method's own (``"split"``: the matched-capacity
    variants); otherwise it is ``continual.adapter.expert_rank`` where the kind has a routed
    branch, else ``"full"`` (a run's setting applies to its routed methods only).
    """

    name: str
    kind: str = "lora"
    policy: str = "token"
    expert_rank: str | None = None

    @property
    def needs_pairs(self) -> bool:
        """Whether the method trains on an image-generation stream (distillation)."""
        return False

    @property
    def edits_gradients(self) -> bool:
        """Whether :meth:`edit_gradients` changes the step's gradient (not under DeepSpeed,
        which steps inside its backward)."""
        return False

    def adapter_config(self, settings: ContinualSettings, tasks: int = 1) -> AdapterConfig:
        """The adapters for a sequence of ``tasks`` tasks (kinds with per-task adapters are
        sized by it; the others take 1, so that their saved adapters fit any sequence)."""
        shared, tasks = settings.adapter, tasks if self.kind in TASK_KINDS else 1
        config = AdapterConfig.of(
            shared, kind=self.kind, routing=self.policy, tasks=tasks, expert_rank="full"
        )
        rank = self.expert_rank or (shared.expert_rank if config.routed else "full")
        return dataclasses.replace(config, expert_rank=rank)

    def configure(self, settings: ContinualSettings, pairs: Sequence[DrawPair] = ()) -> None:
        """Take the settings (and the image-generation stream); called before each task.

        Only settings are taken here, never state: calling it again changes nothing.
        """

    def mix(self, batch: list[Sample], rng: np.random.Generator) -> list[Sample]:
        """The samples actually trained on for one task batch (replay adds old ones)."""
        return batch

    def step_inputs(self, rng: np.random.Generator, processes: Processes) -> Any:
        """What this step's loss terms need beyond the task batch, drawn from ``rng`` on
        every one of the ``processes`` alike and cut to this process's share
        (distillation's pairs)."""
        return None

    def loss_terms(
        self, model: torch.nn.Module, fmt: Format, inputs: Any
    ) -> dict[str, tuple[torch.Tensor, float]]:
        """Named (loss, weight) terms added to the task CE: total = CE + sum weight * loss."""
        return {}

    def edit_gradients(
        self, model: torch.nn.Module, params: list[torch.nn.Parameter], inputs: Any, loss_fn: LossFn
    ) -> dict[str, float]:
        """Edit the step's gradients (``p.grad``, the global batch's) in place after the
        backward, before clipping; ``inputs`` are :meth:`step_inputs`'. Returns figures to
        log (A-GEM: whether it projected)."""
        return {}

    def after_task(
        self,
        model: torch.nn.Module,
        task: Task,
        loss_fn: LossFn,
        seed: int,
        fmt: Format | None = None,
    ) -> None:
        """Called after training each task, the task still set in the adapters (replay fills
        its buffer, EWC its Fisher, CL-MoE its task gates and prototype)."""

    def state_dict(self) -> dict:
        """What must survive a resume besides the adapters (buffers, Fisher, anchors)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
