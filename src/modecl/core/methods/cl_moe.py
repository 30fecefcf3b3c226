r"""CL-MoE (Huai et al., CVPR 2025): a mixture of LoRA experts with two routers, and a
momentum update of the experts after each task.

Dual-router MoE: the `cl-moe` adapters (:mod:`modecl.core.adapters`) gate each token by

    (1 - w) G^I(x) + w G^T(t)          (w = ``task_gate``; the paper's beta = 1 - w)

where G^I = softmax(R x) is the instance-level router, trained as MoELoRA's, and G^T(t),
the task-level router, is a fixed weight per expert for task t. After training task t, over
``samples`` of its training sequences (the instance router alone routing, as in
training): each token counts the instance router's ``top_k`` experts; task t's experts
E_t are the ``task_experts`` most counted, and G^T(t) their counts normalized (0 for the
other experts), per layer.

Task indexing: test samples carry no task. Task t's prototype R_t is the mean
`prompt_embedding` of those training prompts (the host's input embeddings over the
question's text tokens); a sample goes to the trained task whose prototype is nearest by
cosine, and takes its G^T. The adapters hold G^T and the prototypes (saved with them).

Momentum MoE: with theta_{t-1} the experts after task t-1 and phi_t after training task t,

    theta_t = lambda * theta_{t-1} + (1 - lambda) * phi_t           per expert (A rows, B columns)
    lambda  = 1 - momentum   for experts of E_{t-1} not in E_t,   momentum for the others

(``momentum`` = 0.7, the published merge script's alpha). The router takes phi_t.

Where this departs from the paper and its code: the published code trains and tests with
the instance router alone (the task-level mix is commented out), counts top-2 experts in
training at moments of the wall clock and ships no task indexing (its issue #6); we count
after the task on a seeded sample, take G^T over E_t, and index tasks by prompt embedding
(the paper's prototypes are of the model's representation of the instance). Its merge
script matches expert names with ``str.startswith`` against names that hold a prefix, so
as published it merges nothing; we apply the rule it spells out. Experts are rank r / N
(``expert_rank = "split"``), as in its code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from modecl.core.adapters import (
    AdapterConfig,
    adapter_layers,
    pass_kind,
    prompt_embedding,
    routed_weights,
    routing_context,
)
from modecl.core.config import CLMoESettings, ContinualSettings
from modecl.core.methods.base import LossFn, Method
from modecl.core.sequences import IGNORE, DrawPair, Format, collate, understand
from modecl.core.tasks import Task


def task_gate(counts: torch.Tensor, experts: int) -> torch.Tensor:
    """G^T from per-expert counts: the ``experts`` most counted, normalized; 0 elsewhere."""
    top = counts.topk(min(experts, len(counts))).indices
    gate = torch.zeros_like(counts)
    gate[top] = counts[top] / counts[top].sum().clamp(min=1)
    return gate


def momentum_weights(
    previous: torch.Tensor, current: torch.Tensor, momentum: float
) -> torch.Tensor:
    """lambda per expert from the tasks' gates: 1 - momentum for experts of the previous
    task only, momentum for the others."""
    left = (previous > 0) & (current == 0)
    return torch.where(left, 1.0 - momentum, momentum)


@dataclass
class CLMoE(Method):
    settings: CLMoESettings = field(default_factory=CLMoESettings)
    previous: dict[str, torch.Tensor] = field(default_factory=dict)  # experts after the last task

    def adapter_config(self, settings: ContinualSettings, tasks: int = 1) -> AdapterConfig:
        config = super().adapter_config(settings, tasks)
        return dataclasses.replace(config, task_gate=settings.cl_moe.task_gate)

    def configure(self, settings: ContinualSettings, pairs: Sequence[DrawPair] = ()) -> None:
        self.settings = settings.cl_moe

    @torch.no_grad()
    def after_task(
        self,
        model: torch.nn.Module,
        task: Task,
        loss_fn: LossFn,
        seed: int,
        fmt: Format | None = None,
    ) -> None:
        routing, s = routing_context(model), self.settings
        t, layers = routing.task, adapter_layers(model)
        pick = np.random.default_rng(seed).permutation(len(task.train))[: s.samples]
        counts = {name: torch.zeros_like(layer.task_gates[t]) for name, layer in layers.items()}
        prompts = []
        for start in range(0, len(pick), s.batch_size):
            samples = [understand(fmt, task.train[i]) for i in pick[start : start + s.batch_size]]
            batch = {k: v.to(model.device) for k, v in collate(samples, fmt.pad_id).items()}
            attended = batch["attention_mask"].bool()
            with pass_kind(model, "understand"):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            for name, weights in routed_weights(model, attended).items():
                top = weights.topk(s.top_k, dim=-1).indices
                counts[name] += torch.zeros_like(weights).scatter_(1, top, 1.0).sum(0)
            prompt = attended & (batch["labels"] == IGNORE)
            prompts.append(prompt_embedding(model, batch["input_ids"], prompt))
        routing.prototypes[t] = torch.cat(prompts).mean(0)
        for name, layer in layers.items():
            layer.task_gates[t] = task_gate(counts[name], s.task_experts)
            if t > 0:
                lam = momentum_weights(layer.task_gates[t - 1], layer.task_gates[t], s.momentum)
                lam = lam.repeat_interleave(layer.expert_ranks[0])
                layer.lora_A.lerp_(self.previous[f"{name}.lora_A"], lam[:, None])
                layer.lora_B.lerp_(self.previous[f"{name}.lora_B"], lam[None])
        self.previous = {
            f"{name}.{key}": getattr(layer, key).detach().clone()
            for name, layer in layers.items()
            for key in ("lora_A", "lora_B")
        }

    def state_dict(self) -> dict:
        return {"previous": self.previous}

    def load_state_dict(self, state: dict) -> None:
        self.previous = state["previous"]


METHOD = CLMoE("cl-moe", kind="cl-moe", expert_rank="split")
