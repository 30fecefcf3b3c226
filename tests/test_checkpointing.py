"""Gradient checkpointing with MoDE: the gradients of a run without it, whatever runs between.

The published MoDE code crashes under checkpointing; here the recomputation of each layer
gets back the routing state its forward saw (`enable_gradient_checkpointing`).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointError

from modecl.core.adapters import (
    AdapterConfig,
    attach_adapters,
    enable_gradient_checkpointing,
    lm_logits,
    pass_kind,
    routing_context,
)
from tests.fixtures import ADAPTER_HOSTS, HOSTS, batch, randomize

Between = Callable[[nn.Module, torch.Tensor], None]


def nothing(model: nn.Module, ids: torch.Tensor) -> None:
    pass


def other_batch(model: nn.Module, ids: torch.Tensor) -> None:
    model(ids.flip(1))  # same shape, image tokens elsewhere


def teacher(model: nn.Module, ids: torch.Tensor) -> None:
    with torch.no_grad(), pass_kind(model, "teacher"):
        model(ids)


def draw(model: nn.Module, ids: torch.Tensor) -> None:
    with pass_kind(model, "draw"):  # the task policy sends every token to the V-Adapter
        model(ids)


def shorter_batch(model: nn.Module, ids: torch.Tensor) -> None:
    model(ids[:, :5])


def adapter_grads(
    host: str, checkpointing: str, between: Between, grad_first: bool = False, fused: bool = True
) -> list[torch.Tensor]:
    """Adapter gradients of one mixed-batch loss, with `between` run before its backward.

    `grad_first`: an `autograd.grad` over the same graph (kept) runs first, as the conflict
    monitor does; each checkpointed layer is then recomputed twice. `fused`: the layers'
    fused path (the default) or the reference.
    """
    model = attach_adapters(HOSTS[host](), AdapterConfig(dropout=0.0, routing="task"))
    routing_context(model).fused = fused
    randomize(model)
    model.train()
    if checkpointing == "routing-safe":
        enable_gradient_checkpointing(model)
    elif checkpointing == "plain-hf":
        model.activation_checkpointing_enable({"use_reentrant": False})
    ids = batch()
    logits = lm_logits(model, input_ids=ids, use_cache=False)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    params = [p for p in model.parameters() if p.requires_grad]
    if grad_first:
        first = torch.autograd.grad(loss, params, retain_graph=True)
    between(model, ids)
    loss.backward()
    if grad_first:
        for a, b in zip(first, params, strict=True):
            torch.testing.assert_close(a, b.grad, rtol=1e-6, atol=1e-7)
    return [p.grad for p in model.parameters() if p.requires_grad]


BETWEEN = [nothing, other_batch, teacher, draw, shorter_batch]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("between", BETWEEN, ids=lambda f: f.__name__)
@pytest.mark.parametrize("host", ADAPTER_HOSTS)
def test_routing_safe_checkpointing_gives_the_reference_gradients(host, between, fused):
    reference = adapter_grads(host, "off", nothing, fused=False)
    assert all(torch.count_nonzero(g) > 0 for g in reference)
    grads = adapter_grads(host, "routing-safe", between, fused=fused)
    assert len(grads) == len(reference)
    for ours, expected in zip(grads, reference, strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("host", ADAPTER_HOSTS)
def test_routing_safe_checkpointing_backpropagates_a_graph_twice(host):
    reference = adapter_grads(host, "off", nothing)
    grads = adapter_grads(host, "routing-safe", teacher, grad_first=True)
    for ours, expected in zip(grads, reference, strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("between", "failure"),
    [
        (nothing, None),
        (other_batch, "wrong gradients"),
        (teacher, CheckpointError),
        (draw, CheckpointError),
        (shorter_batch, ValueError),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_plain_hf_checkpointing_routes_the_recomputation_by_the_latest_forward(between, failure):
    """What the routing-safe version fixes: the same runs without the state restored."""
    reference = adapter_grads("llama", "off", nothing)
    if isinstance(failure, type):
        with pytest.raises(failure):
            adapter_grads("llama", "plain-hf", between)
        return
    grads = adapter_grads("llama", "plain-hf", between)
    pairs = zip(grads, reference, strict=True)
    same = all(torch.allclose(g, r, rtol=1e-6, atol=1e-7) for g, r in pairs)
    assert same == (failure is None)


def test_checkpointing_is_on_and_can_be_enabled_before_attaching():
    model = enable_gradient_checkpointing(HOSTS["llama"]())
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    attach_adapters(model, AdapterConfig(dropout=0.0, routing="task"))
    randomize(model)
    model.train()
    ids = batch()
    logits = lm_logits(model, input_ids=ids, use_cache=False)
    other_batch(model, ids)
    logits.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    model.activation_checkpointing_disable()
    model.zero_grad()
    lm_logits(model, input_ids=ids, use_cache=False).square().mean().backward()
    expected_grads = [p.grad for p in model.parameters() if p.requires_grad]
    for ours, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)
