"""The routed layers by torch.compile (`compile_adapters`): the reference's floats within
float32 rounding, routing-safe, isolating, and the eager fused path where nothing compiles.

Each distinct layer (kind, rank, pass, training) compiles once per process: a few seconds.
"""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config
import torch.nn.functional as F
from torch import nn

from modecl.core import adapters
from modecl.core.adapters import (
    AdapterConfig,
    AdapterLinear,
    RoutingContext,
    RoutingState,
    adapter_layers,
    attach_adapters,
    compile_adapters,
    enable_gradient_checkpointing,
    lm_logits,
    pass_kind,
    prompt_embedding,
    routed_weights,
    routing_context,
)
from tests.fixtures import HOSTS, adapted, batch, randomize, step_results


def step(
    model: nn.Module, compiled: bool, kind: str | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(logits and routed weights, every gradient) of one step, compiled or by the reference."""
    results = step_results(model, compiled, batch(), kind, None, compiled=compiled)
    outputs = 1 + len(routed_weights(model))
    return results[:outputs], results[outputs:]


def routers_far_from_uniform(model: nn.Module) -> nn.Module:
    for layer in adapter_layers(model).values():
        if layer.router is not None:
            nn.init.normal_(layer.router.weight, std=0.5)
    model.get_input_embeddings().weight.requires_grad_(True)
    return model


def assert_within_float32(ours: tuple[list, list], expected: tuple[list, list]) -> None:
    """Logits and router weights within 1e-6 of each tensor's largest value, gradients within
    1e-5 (their sums run in another order: measured up to 2.7e-6)."""
    for tolerance, mine, theirs in zip((1e-6, 1e-5), ours, expected, strict=True):
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
            scale = b.abs().max().item() if b.numel() else 0.0
            torch.testing.assert_close(a, b, rtol=0, atol=tolerance * scale)


CASES = [
    pytest.param(dict(kind="mode"), True, None, id="mode-train"),
    pytest.param(dict(kind="mode"), False, None, id="mode-eval"),
    pytest.param(dict(kind="mode", expert_rank="split"), True, None, id="mode-split-train"),
    pytest.param(dict(kind="moe-lora"), True, None, id="moe-lora-train"),
    pytest.param(dict(kind="moe-lora", expert_rank="split", alpha=2.0), True, None, id="moe-s"),
    pytest.param(dict(kind="mode", routing="task"), True, "understand", id="task-understand"),
    pytest.param(dict(kind="mode", routing="sample"), True, "understand", id="sample-understand"),
    pytest.param(dict(kind="mode", routing="task"), True, "draw", id="task-draw"),
    pytest.param(dict(kind="mode-text-lora"), True, None, id="mode-text-lora-train"),
    pytest.param(dict(kind="mode-text-lora"), False, None, id="mode-text-lora-eval"),
]


@pytest.mark.parametrize(("config", "training", "kind"), CASES)
def test_compiled_path_gives_the_reference_floats(config, training, kind):
    """Outputs, router weights and every gradient within float32 rounding, whatever the kind,
    rank, policy, pass or scaling (dropout 0: the compiled graph draws its own masks)."""
    model = routers_far_from_uniform(adapted("llama", dropout=0.0, **config).train(training))
    compiled = step(model, True, kind)
    assert routing_context(model).compiled  # it compiled: no fallback
    reference = step(model, False, kind)
    assert not torch.equal(compiled[0][0], HOSTS["llama"]()(batch()).logits)
    assert_within_float32(compiled, reference)


def test_compiled_path_gives_the_reference_floats_with_cl_moe_task_gates_and_chameleon():
    model = adapted("llama", kind="cl-moe", tasks=2, num_experts=3, dropout=0.0).train()
    routing_context(model).prototypes[0] = prompt_embedding(model, batch())[0]
    for layer in adapter_layers(model).values():
        layer.task_gates[0] = torch.tensor([0.2, 0.3, 0.5])
    routers_far_from_uniform(model)
    assert_within_float32(step(model, True), step(model, False))
    assert routing_context(model).state.task_ids is not None
    chameleon = attach_adapters(HOSTS["chameleon"](), AdapterConfig(dropout=0.0))
    randomize(chameleon)
    routers_far_from_uniform(chameleon.train())
    assert_within_float32(step(chameleon, True), step(chameleon, False))


def test_compiled_dropout_is_seeded_and_drops():
    """With dropout the compiled graph draws its own masks: the same seed gives the same
    floats, and the step differs from one without dropout."""
    model = routers_far_from_uniform(adapted("llama", kind="mode").train())
    (first, first_grads), (again, again_grads) = step(model, True), step(model, True)
    for a, b in zip(first + first_grads, again + again_grads, strict=True):
        assert torch.equal(a, b)
    model.eval()
    assert not torch.allclose(first[0], step(model, True)[0][0])


def isolated_layer(kind: str = "mode") -> AdapterLinear:
    torch.manual_seed(3)
    config = AdapterConfig(kind=kind, dropout=0.0, num_experts=3, rank=4, alpha=8.0)
    routing = RoutingContext(config, image_token_ids=None, compiled=True)
    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)
    routing.state = RoutingState(image_mask=mask)
    layer = AdapterLinear(nn.Linear(16, 24), config, routing).train()
    nn.init.normal_(layer.lora_B)
    return layer


@pytest.mark.parametrize("kind", ["mode", "mode-text-lora"])
@pytest.mark.parametrize("loss_on", ["text", "image"])
def test_compiled_layer_keeps_exact_zero_isolation(loss_on, kind):
    """A loss on image tokens alone gives the text experts and the router exactly zero
    gradient; one on text tokens alone the V-Adapter."""
    layer = isolated_layer(kind)
    mask = layer.routing.state.image_mask
    weight = (mask if loss_on == "image" else ~mask).unsqueeze(-1).float()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
    (layer(x) * weight).sum().backward()
    assert layer.routing.compiled
    text, image = layer.columns["text"], layer.columns["image"]
    quiet = image if loss_on == "text" else text
    loud = text if loss_on == "text" else image
    assert torch.count_nonzero(layer.lora_A.grad[quiet]) == 0
    assert torch.count_nonzero(layer.lora_B.grad[:, quiet]) == 0
    assert torch.count_nonzero(layer.lora_A.grad[loud]) > 0
    if layer.router is not None:
        router_grad = torch.count_nonzero(layer.router.weight.grad)
        assert (router_grad == 0) == (loss_on == "image")


def test_compiled_path_under_gradient_checkpointing_is_routing_safe():
    """Checkpointed layers recomputed after a draw pass (every token to the V-Adapter) and
    with dropout on: the gradients of the run without checkpointing, bit for bit."""
    grads = []
    for checkpointing in (False, True):
        model = compile_adapters(HOSTS["llama"]())
        attach_adapters(model, AdapterConfig(routing="task"))
        randomize(model)
        model.train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        ids = batch()
        torch.manual_seed(7)
        logits = lm_logits(model, input_ids=ids, use_cache=False)
        with pass_kind(model, "draw"):
            model(ids)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        assert routing_context(model).compiled
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_compile_adapters_before_or_after_attaching():
    before = attach_adapters(compile_adapters(HOSTS["llama"]()), AdapterConfig())
    after = compile_adapters(attach_adapters(HOSTS["llama"](), AdapterConfig()))
    plain = attach_adapters(HOSTS["llama"](), AdapterConfig())
    assert routing_context(before).compiled and routing_context(after).compiled
    assert not routing_context(plain).compiled
    assert not routing_context(compile_adapters(after, enabled=False)).compiled


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_without_a_compiler_the_eager_fused_path_runs_with_a_warning():
    """No C++ compiler for inductor: one warning naming the failure, then the eager fused
    path (the reference's floats, bit for bit), and no second try."""
    torch._dynamo.reset()  # nothing compiled before this test is reused
    adapters._compiled.cache_clear()
    layer = isolated_layer()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
    no_compiler = {"cpp.cxx": ("/nonexistent/c++",), "force_disable_caches": True}
    try:
        with (
            torch._inductor.config.patch(no_compiler),
            pytest.warns(UserWarning, match="torch.compile of the adapters failed"),
        ):
            out = layer(x)
    finally:
        torch._dynamo.reset()
        adapters._compiled.cache_clear()
    assert not layer.routing.compiled
    assert torch.equal(out, layer(x))
    assert torch._inductor.config.cpp.cxx != no_compiler["cpp.cxx"]
    assert not torch._inductor.config.force_disable_caches
