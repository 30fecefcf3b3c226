"""The mechanisms of CL-MoE, O-LoRA and A-GEM on hand-made tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modecl.core.adapters import adapter_layers, attach_adapters, routing_context, training_task
from modecl.core.config import ConfigError, ContinualSettings, from_dict
from modecl.core.methods import get_method
from modecl.core.methods.a_gem import project
from modecl.core.methods.cl_moe import momentum_weights, task_gate
from modecl.core.methods.o_lora import orthogonal_terms
from modecl.core.runner import check_methods
from modecl.core.train import check_engine
from modecl.digits.model import build_model
from tests.conftest import tiny_config
from tests.fixtures import adapted, batch, deepspeed_accelerator, processes_at

# --- O-LoRA -------------------------------------------------------------------------------


def one_layer_o_lora():
    """A tiny Llama with o-lora on one module of one layer: 3 tasks of rank 2."""
    model = adapted(
        "llama", kind="o-lora", tasks=3, rank=2, target_modules=("layers.0.mlp.up_proj",)
    )
    (layer,) = adapter_layers(model).values()
    return model, layer


def test_o_lora_terms_are_the_absolute_overlaps_and_the_new_norms():
    model, layer = one_layer_o_lora()
    a = torch.zeros_like(layer.lora_A)
    a[0:2, :3] = torch.tensor([[1.0, 0, 0], [0, 1, 0]])  # task 0
    a[2:4, :3] = torch.tensor([[0.0, 0, 1], [1, 1, 0]])  # task 1
    a[4:6, :3] = torch.tensor([[1.0, 2, 3], [0, 0, -1]])  # task 2
    b = torch.zeros_like(layer.lora_B)
    b[:2, 4:6] = torch.tensor([[3.0, 0], [0, 4]])
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    orthogonal, l2 = orthogonal_terms(model, 2)
    # rows of A_0; A_1 against the rows of A_2: (1, 0), (2, 0), (3, -1), (3, 0)
    assert orthogonal.item() == 10.0
    assert l2.item() == pytest.approx(math.sqrt(15) + 5.0)
    assert orthogonal_terms(model, 0)[0].item() == 0.0  # no earlier LoRA
    assert orthogonal_terms(model, 1)[0].item() == 2.0  # A_0 A_1^T = [[0, 1], [0, 1]]


def test_o_lora_sends_exactly_zero_gradient_into_frozen_tasks():
    """Task 2's step: CE + orthogonality + l2 reach task 2's LoRA only."""
    model, layer = one_layer_o_lora()
    settings = from_dict(ContinualSettings, {"o_lora": {"l2_weight": 0.1}})
    method = get_method("o-lora")
    method.configure(settings)
    ids = batch()
    model.train()
    with training_task(model, 2):
        terms = method.loss_terms(model, None, None)
        assert set(terms) == {"orthogonal", "l2"} and terms["l2"][1] == 0.1
        loss = model(ids, labels=ids).loss + sum(w * v for v, w in terms.values())
        loss.backward()
    assert torch.count_nonzero(layer.lora_A.grad[:4]) == 0
    assert torch.count_nonzero(layer.lora_B.grad[:, :4]) == 0
    assert torch.count_nonzero(layer.lora_A.grad[4:]) == layer.lora_A[4:].numel()
    assert routing_context(model).task is None
    assert method.loss_terms(model, None, None) == {}  # out of training: no term


def test_o_lora_refuses_weight_decay_before_any_work():
    settings = from_dict(ContinualSettings, {"train": {"weight_decay": 0.01}})
    with pytest.raises(ConfigError, match=r"method o-lora: train\.weight_decay is 0\.01"):
        check_methods(["seq-lora", "o-lora"], settings)
    check_methods(["seq-lora", "ewc"], settings)


# --- A-GEM --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grad", "reference", "expected", "projected"),
    [
        ([1.0, 0.0], [-1.0, 1.0], [0.5, 0.5], True),  # conflict: onto the plane of g_ref
        ([2.0, -1.0, 0.0], [0.0, 1.0, 0.0], [2.0, 0.0, 0.0], True),
        ([1.0, 1.0], [1.0, 0.0], [1.0, 1.0], False),  # agreement: kept
        ([1.0, 0.0], [0.0, 3.0], [1.0, 0.0], False),  # orthogonal: kept
    ],
)
def test_a_gem_projection(grad, reference, expected, projected):
    step, done = project(torch.tensor(grad), torch.tensor(reference))
    assert done == projected
    assert step.tolist() == expected
    assert torch.dot(step, torch.tensor(reference)).item() >= 0


def test_a_gem_edits_the_gradient_in_place_against_the_memorys():
    """g = (1, 0 | 0), g_ref = (-1, 1 | 0) over two parameters: g becomes (0.5, 0.5 | 0)."""
    first, second = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    first.grad, second.grad = torch.tensor([1.0, 0.0]), torch.tensor([0.0])

    def loss_fn(model, samples):
        assert samples == ["memory"]
        return -first[0] + first[1] + 0 * second.sum()

    method = get_method("a-gem")
    figures = method.edit_gradients(None, [first, second], ["memory"], loss_fn)
    assert figures == {"projected": 1.0}
    assert first.grad.tolist() == [0.5, 0.5] and second.grad.tolist() == [0.0]
    assert method.edit_gradients(None, [first, second], [], loss_fn) == {}  # no memory yet


def test_a_gem_memory_and_reference_batches(digits):
    method = get_method("a-gem")
    settings = from_dict(ContinualSettings, {"a_gem": {"memory_size": 6, "batch_size": 4}})
    method.configure(settings)
    assert method.step_inputs(np.random.default_rng(5), processes_at(0, 2)) == []  # none yet
    first, second = digits.tasks(["parity", "comparison"])
    method.after_task(None, first, None, seed=0)
    method.after_task(None, second, None, seed=1)
    assert len(method.memory) == 6
    assert {s.question for s in method.memory} == {
        first.train[0].question,
        second.train[0].question,
    }
    # every process draws the same whole reference batch
    draws = [method.step_inputs(np.random.default_rng(5), processes_at(r, 2)) for r in (0, 1)]
    assert draws[0] == draws[1] and len(draws[0]) == 4


def test_a_gem_is_refused_under_deepspeed_before_any_work(digits):
    settings = from_dict(ContinualSettings, {"train": {"max_train_samples": 8, "batch_size": 4}})
    accelerator = deepspeed_accelerator(2, zero_stage=2)
    with pytest.raises(
        ConfigError, match="method a-gem projects each step's gradient, but DeepSpeed"
    ):
        check_engine(accelerator, settings, methods=[get_method("seq-lora"), get_method("a-gem")])
    check_engine(deepspeed_accelerator(2, zero_stage=2), settings, methods=[get_method("ewc")])


# --- CL-MoE -------------------------------------------------------------------------------


def test_cl_moe_task_gate_is_the_most_counted_experts_normalized():
    counts = torch.tensor([3.0, 9.0, 0.0, 6.0])
    assert task_gate(counts, 2).tolist() == pytest.approx([0.0, 0.6, 0.0, 0.4])
    assert task_gate(counts, 4).tolist() == pytest.approx([1 / 6, 0.5, 0.0, 1 / 3])
    assert task_gate(torch.zeros(3), 2).tolist() == [0.0, 0.0, 0.0]


def test_cl_moe_momentum_weights_by_the_experts_roles():
    previous = torch.tensor([0.5, 0.5, 0.0, 0.0])  # E_{t-1} = {0, 1}
    current = torch.tensor([0.0, 0.7, 0.3, 0.0])  # E_t = {1, 2}
    lam = momentum_weights(previous, current, 0.7)
    # expert 0: left by the new task, takes 0.7 of its new weights; the others keep 0.7
    torch.testing.assert_close(lam, torch.tensor([0.3, 0.7, 0.7, 0.7]))


def test_cl_moe_after_a_task_fills_its_gate_and_prototype_and_merges_by_momentum(digits):
    """Task 1 ends: G^T(1) from the instance router's top-k counts, R_1 the mean prompt
    embedding, and every expert theta = lam theta_0 + (1 - lam) phi_1 by its role."""
    settings = from_dict(
        ContinualSettings,
        {"adapter": {"rank": 4, "num_experts": 4}, "cl_moe": {"samples": 8, "task_experts": 2}},
    )
    method = get_method("cl-moe")
    method.configure(settings)
    model = build_model(digits.vocab, tiny_config().model, seed=0)
    attach_adapters(model, method.adapter_config(settings, tasks=2))
    task = digits.tasks(["parity"])[0]
    layers = adapter_layers(model)
    g = torch.Generator().manual_seed(0)
    for layer in layers.values():
        layer.task_gates[0] = torch.tensor([0.5, 0.5, 0.0, 0.0])
        with torch.no_grad():
            layer.lora_B.normal_(generator=g)
    method.previous = {
        f"{n}.{k}": torch.randn(getattr(layer, k).shape, generator=g)
        for n, layer in layers.items()
        for k in ("lora_A", "lora_B")
    }
    previous = dict(method.previous)
    trained = {
        n: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
        for n, layer in layers.items()
    }
    model.eval()
    with training_task(model, 1):
        method.after_task(model, task, None, seed=0, fmt=digits.format)
    routing = routing_context(model)
    assert routing.prototypes[1].abs().sum() > 0 and routing.prototypes[0].abs().sum() == 0
    for name, layer in layers.items():
        gate = layer.task_gates[1]
        assert (gate > 0).sum() == 2 and gate.sum().item() == pytest.approx(1.0)
        lam = momentum_weights(layer.task_gates[0], gate, 0.7)  # rank 1 per expert
        phi_A, phi_B = trained[name]
        expected_A = lam[:, None] * previous[f"{name}.lora_A"] + (1 - lam[:, None]) * phi_A
        expected_B = lam * previous[f"{name}.lora_B"] + (1 - lam) * phi_B
        torch.testing.assert_close(layer.lora_A.detach(), expected_A)
        torch.testing.assert_close(layer.lora_B.detach(), expected_B)
        # theta_1 is the next task's theta_{t-1}
        assert torch.equal(method.state_dict()["previous"][f"{name}.lora_A"], layer.lora_A)
