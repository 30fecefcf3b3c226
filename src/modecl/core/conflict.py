r"""Gradient-conflict monitor: does a step on the text loss move the image-generation loss?

The paper explains inter-modal forgetting by gradient conflict. Let θ be the trainable
(adapter) parameters, L_I the image-generation loss on a fixed probe batch, and L_T the
step's understanding loss. A step changes θ by Δθ, and to first order

    ΔL_I ≈ <∇L_I, Δθ>                                   (any optimizer)
         = -lr · <∇L_I, ∇L_T>                           (plain SGD on L_T alone)

so the image loss rises when the two gradients point against each other (cosine < 0).
On a monitored step the monitor records

    cosine               cos(∇L_I, ∇L_T)
    inner_product_text   <∇L_I, ∇L_T>
    predicted            <∇L_I, Δθ>,  Δθ = θ after optimizer.step() - θ before
    measured             L_I(θ after) - L_I(θ before)
    sgd                  -lr · <∇L_I, ∇L_T>, the paper's formula at the step's lr

and the first three again for each parameter group: the `text`, `image` and `shared`
branches (their rows of `lora_A` and columns of `lora_B`, by `layer.columns`) and the
`router`; group figures add up to the totals (the groups cover every trainable parameter
of an adapted host). The inner product and the predicted change are split by site too:
by decoder layer (`by_layer`, the index in the adapted module's name) and by adapted module
(`by_module`: gate_proj, up_proj, down_proj, ...), each split adding up to the totals: which
parameters carry the image loss's change.

Δθ is the optimizer's real update (AdamW moments, clipping, schedule included), so
`predicted` is exact to first order for any optimizer, not only SGD (`train.optimizer`:
under plain SGD, no clipping and the CE alone, `predicted` equals `sgd`).
Under the `sample` routing policy the probe's draw pass and an understanding batch take
disjoint branches, so every inner product is exactly zero: no first-order conflict.

∇L_T is the gradient of the understanding cross-entropy alone, taken before the
distillation and penalty terms are added: it is the force the paper blames, while the
distillation term is the method's defence against it; Δθ contains both. It is computed
with the step's own graph (train mode, the step's dropout), with `retain_graph`, so the
step's backward is left unchanged.

L_I is the teacher-forced cross-entropy of the image codes of held-out ("draw a <digit>",
image) pairs in a `draw` pass, as `image_nll` measures it. The probe runs in eval mode
(dropout off, so before and after see the same function and no random numbers are
drawn) and the model's mode is restored afterwards: the monitor never changes training.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from modecl.core.adapters import adapter_layers
from modecl.core.evaluate import image_code_nll
from modecl.core.processes import Processes
from modecl.core.sequences import DrawPair, Format, collate

Pieces = list[tuple[torch.nn.Parameter, tuple[slice, ...]]]


def parameter_groups(model: torch.nn.Module) -> dict[str, Pieces]:
    """Each group's pieces of the adapter parameters: (parameter, index) pairs."""
    groups: dict[str, Pieces] = defaultdict(list)
    for layer in adapter_layers(model).values():
        for branch, cols in layer.columns.items():
            groups[branch] += [(layer.lora_A, (cols,)), (layer.lora_B, (slice(None), cols))]
        if layer.router is not None:
            groups["router"].append((layer.router.weight, (slice(None),)))
    return dict(groups)


def parameter_sites(model: torch.nn.Module) -> dict[str, dict[str, Pieces]]:
    """The adapter parameters split by decoder layer (``by_layer``: "0", "1", ...; "-" for
    a module outside a numbered layer) and by module (``by_module``: the last part of the
    adapted module's name)."""
    sites: dict[str, dict[str, Pieces]] = {"by_layer": defaultdict(list), "by_module": {}}
    for name, layer in adapter_layers(model).items():
        pieces: Pieces = [(p, (slice(None),)) for p in layer.parameters() if p.requires_grad]
        index = re.search(r"(?:^|\.)(\d+)\.", name)
        sites["by_layer"][index.group(1) if index else "-"] += pieces
        sites["by_module"].setdefault(name.rsplit(".", 1)[-1], []).extend(pieces)
    return {split: dict(groups) for split, groups in sites.items()}


def _dot(a: dict, b: dict, pieces: Pieces) -> float:
    return sum(float((a[p][i].double() * b[p][i].double()).sum()) for p, i in pieces)


def _cosine(ab: float, aa: float, bb: float) -> float | None:
    return ab / (aa * bb) ** 0.5 if aa > 0 and bb > 0 else None


def can_monitor(processes: Processes) -> bool:
    """Whether the monitor can watch a run of ``processes``: in one process without
    DeepSpeed only (its own backward passes would set off DeepSpeed's gradient hooks)."""
    return processes.count == 1 and processes.zero_stage is None


class ConflictMonitor:
    """Every ``every`` steps: gradient conflict and image-loss change on a probe batch."""

    def __init__(self, fmt: Format, probe: Sequence[DrawPair], every: int) -> None:
        if every < 1:
            raise ValueError(f"monitor.every must be at least 1, got {every}")
        self.fmt = fmt
        self.batch = collate([fmt.draw_example(p) for p in probe], fmt.pad_id)
        self.every = every
        self._pending: dict[str, Any] | None = None

    def due(self, step: int) -> bool:
        """Whether training step ``step`` (0-based, counted over the task) is monitored."""
        return step % self.every == 0

    def image_loss(self, model: torch.nn.Module) -> torch.Tensor:
        """L_I on the probe batch, in eval mode; the model's mode is restored."""
        training = model.training
        model.eval()
        try:
            total, count = image_code_nll(model, self.fmt, self.batch)
            return total / count
        finally:
            model.train(training)

    def before(self, model: torch.nn.Module, task_loss: torch.Tensor, lr: float) -> None:
        """Before ``backward``: ∇L_T (graph kept for the step), ∇L_I, L_I, θ, and the lr."""
        params = [p for p in model.parameters() if p.requires_grad]
        grad_text = torch.autograd.grad(task_loss, params, retain_graph=True, allow_unused=True)
        loss = self.image_loss(model)
        grad_image = torch.autograd.grad(loss, params, allow_unused=True)

        def by_param(grads: Sequence[torch.Tensor | None]) -> dict:
            pairs = zip(params, grads, strict=True)
            return {p: torch.zeros_like(p) if g is None else g for p, g in pairs}

        self._pending = {
            "params": params,
            "theta": {p: p.detach().clone() for p in params},
            "text": by_param(grad_text),
            "image": by_param(grad_image),
            "loss": loss.item(),
            "lr": lr,
        }

    @torch.no_grad()
    def after(self, model: torch.nn.Module) -> dict[str, Any]:
        """After ``optimizer.step()``: this step's figures (see the module doc)."""
        if self._pending is None:
            raise RuntimeError("ConflictMonitor.after() without a matching before()")
        s, self._pending = self._pending, None
        delta = {p: p.detach() - s["theta"][p] for p in s["params"]}
        gi, gt = s["image"], s["text"]

        def figures(pieces: Pieces) -> dict[str, Any]:
            inner = _dot(gi, gt, pieces)
            return {
                "cosine": _cosine(inner, _dot(gi, gi, pieces), _dot(gt, gt, pieces)),
                "inner_product_text": inner,
                "predicted_image_loss_change": _dot(gi, delta, pieces),
            }

        def changes(pieces: Pieces) -> dict[str, float]:
            return {
                "inner_product_text": _dot(gi, gt, pieces),
                "predicted_image_loss_change": _dot(gi, delta, pieces),
            }

        loss_after = self.image_loss(model).item()
        total = figures([(p, (slice(None),)) for p in s["params"]])
        sites = {
            split: {site: changes(pieces) for site, pieces in groups.items()}
            for split, groups in parameter_sites(model).items()
        }
        return {
            "image_loss": s["loss"],
            "measured_image_loss_change": loss_after - s["loss"],
            **total,
            "sgd_image_loss_change": -s["lr"] * total["inner_product_text"],
            "by_group": {g: figures(pieces) for g, pieces in parameter_groups(model).items()},
            **sites,
        }


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _correlation(x: list[float], y: list[float]) -> float | None:
    """Pearson correlation; None for fewer than 2 points or a constant series."""
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def summarize_conflict(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """One task's monitored steps: mean cosines and inner products, summed changes.

    `correlation` is Pearson's between the steps' predicted and measured changes,
    `sgd_correlation` between the SGD formula's and the measured; figures without a defined
    value (no steps, one step, a zero gradient) are None. `by_layer` and `by_module` sum each
    site's inner products and predicted changes.
    """
    predicted = [s["predicted_image_loss_change"] for s in steps]
    measured = [s["measured_image_loss_change"] for s in steps]
    sgd = [s["sgd_image_loss_change"] for s in steps]
    groups = steps[0]["by_group"] if steps else {}
    return {
        "steps": len(steps),
        "mean_cosine": _mean([s["cosine"] for s in steps]),
        "predicted_image_loss_change": float(sum(predicted)) if steps else None,
        "measured_image_loss_change": float(sum(measured)) if steps else None,
        "sgd_image_loss_change": float(sum(sgd)) if steps else None,
        "correlation": _correlation(predicted, measured),
        "sgd_correlation": _correlation(sgd, measured),
        **{
            split: {
                site: {
                    key: float(sum(s[split][site][key] for s in steps))
                    for key in ("inner_product_text", "predicted_image_loss_change")
                }
                for site in steps[0][split]
            }
            for split in ("by_layer", "by_module")
            if steps and split in steps[0]
        },
        "by_group": {
            g: {
                "mean_cosine": _mean([s["by_group"][g]["cosine"] for s in steps]),
                "inner_product_text": _mean(
                    [s["by_group"][g]["inner_product_text"] for s in steps]
                ),
                "predicted_image_loss_change": float(
                    sum(s["by_group"][g]["predicted_image_loss_change"] for s in steps)
                ),
            }
            for g in groups
        },
    }
