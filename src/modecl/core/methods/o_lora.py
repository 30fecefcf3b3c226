r"""O-LoRA (Wang et al., EMNLP 2023 Findings): one LoRA per task, learned in a subspace
orthogonal to the earlier tasks' LoRAs.

Task k's LoRA is expert k of the `o-lora` adapters (:mod:`modecl.core.adapters`): while it
trains, the earlier tasks' LoRAs are frozen (exactly zero gradient) and still add their
output; out of training every task's LoRA adds up. The step's loss gains, over every
adapted layer,

    orthogonal = sum_{i<k} sum |A_i A_k^T|        (entries of the r x r overlaps)
    l2         = ||A_k||_2 + ||B_k||_2           (Frobenius norms of the new LoRA)

with weights ``orthogonal_weight`` (lambda_1) and ``l2_weight`` (lambda_2): the published
code's terms (sum of absolute overlaps, unsquared norms; the paper writes squares) and its
scripts' weights (0.5 and 0). The earlier A enter detached: no gradient reaches them.
AdamW's weight decay would still shrink the frozen LoRAs (they share a tensor with the new
one), so ``train.weight_decay`` must be 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from modecl.core.adapters import AdapterConfig, adapter_layers, routing_context
from modecl.core.config import ContinualSettings, OLoRASettings
from modecl.core.methods.base import Method
from modecl.core.sequences import DrawPair, Format


def orthogonal_terms(model: torch.nn.Module, task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(orthogonality, l2) of task ``task``'s LoRA against the earlier ones, over all layers."""
    orthogonal, l2 = [], []
    for layer in adapter_layers(model).values():
        start, stop = task * layer.rank, (task + 1) * layer.rank
        new_A, new_B = layer.lora_A[start:stop], layer.lora_B[:, start:stop]
        orthogonal.append((layer.lora_A[:start].detach() @ new_A.T).abs().sum())
        l2 += [new_A.norm(), new_B.norm()]
    return torch.stack(orthogonal).sum(), torch.stack(l2).sum()


@dataclass
class OLoRA(Method):
    settings: OLoRASettings = field(default_factory=OLoRASettings)

    def adapter_config(self, settings: ContinualSettings, tasks: int = 1) -> AdapterConfig:
        if settings.train.weight_decay:
            raise ValueError(
                f"train.weight_decay is {settings.train.weight_decay}, but AdamW's weight decay "
                "would shrink the frozen LoRAs of earlier tasks; set it to 0"
            )
        return super().adapter_config(settings, tasks)

    def configure(self, settings: ContinualSettings, pairs: Sequence[DrawPair] = ()) -> None:
        self.settings = settings.o_lora

    def loss_terms(
        self, model: torch.nn.Module, fmt: Format, inputs: Any
    ) -> dict[str, tuple[torch.Tensor, float]]:
        task = routing_context(model).task
        if task is None:
            return {}
        orthogonal, l2 = orthogonal_terms(model, task)  # no earlier LoRA at task 0: 0
        s = self.settings
        return {"orthogonal": (orthogonal, s.orthogonal_weight), "l2": (l2, s.l2_weight)}


METHOD = OLoRA("o-lora", kind="o-lora", expert_rank="full")
