"""The adapter layer, by values, on tiny Llama and Chameleon hosts."""

from __future__ import annotations

import json
import re
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from modecl.core.adapters import (
    KINDS,
    AdapterConfig,
    AdapterLinear,
    RoutingContext,
    RoutingState,
    adapter_layers,
    adapters_off,
    attach_adapters,
    detach_adapters,
    expert_shares,
    has_adapters,
    image_mask_override,
    lm_logits,
    load_adapters,
    pass_kind,
    prompt_embedding,
    routed_weights,
    router_entropy,
    routing_context,
    save_adapters,
    trainable_parameters,
    training_task,
)
from modecl.core.generation import generate
from modecl.core.modality import image_mask, image_token_ids
from tests.fixtures import (
    ADAPTER_HOSTS,
    CODES,
    HEADS,
    HOSTS,
    IMAGE_IDS,
    SIZES,
    TEXT_IDS,
    adapted,
    batch,
    randomize,
    step_results,
    tiny_llama,
)


def test_both_hosts_see_the_same_modality_for_the_same_ids():
    """The tiny Llama names the tiny Chameleon's image ids; the batches' ids are of each kind."""
    llama, chameleon = (image_token_ids(HOSTS[host]().config) for host in ADAPTER_HOSTS)
    assert llama == chameleon == IMAGE_IDS
    assert set(IMAGE_IDS) <= set(image_token_ids(HOSTS["emu3"]().config))
    assert not set(TEXT_IDS) & set(image_token_ids(HOSTS["emu3"]().config))
    assert set(batch("image").unique().tolist()) <= set(IMAGE_IDS)
    assert not set(batch("text").unique().tolist()) & set(IMAGE_IDS)


# --- zero init, peft, the stacked layer ---------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("host", ADAPTER_HOSTS)
def test_zero_init_equals_host(host, kind):
    model = HOSTS[host]()
    ids = batch()
    expected = model(ids).logits
    attach_adapters(model, AdapterConfig(kind=kind))
    layers = adapter_layers(model)
    assert len(layers) == 3 * SIZES["num_hidden_layers"]
    adapter_params = {
        id(p) for layer in layers.values() for n, p in layer.named_parameters() if "base" not in n
    }
    for param in model.parameters():
        assert param.requires_grad == (id(param) in adapter_params)
    assert torch.equal(model(ids).logits, expected)


def test_lora_equals_peft_lora():
    peft = pytest.importorskip("peft")
    ours = attach_adapters(tiny_llama(), AdapterConfig(kind="lora"))
    randomize(ours)
    targets = ["gate_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets)
    theirs = peft.get_peft_model(tiny_llama(), config).eval()
    for name, layer in adapter_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        peft_layer.lora_A["default"].weight.data.copy_(layer.lora_A)
        peft_layer.lora_B["default"].weight.data.copy_(layer.lora_B)
    ids = batch()
    expected = theirs(ids).logits
    assert not torch.allclose(expected, tiny_llama()(ids).logits, atol=1e-3)
    torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)


def loop_reference(layer: AdapterLinear, x: torch.Tensor, state: RoutingState) -> torch.Tensor:
    """The same layer written as a plain loop over experts, one token mask per branch."""
    out = layer.base(x)
    start = 0
    for name, n in layer.branches:
        r = layer.ranks[name]
        columns = range(start, start + n * r, r)
        start += n * r
        member = torch.ones(x.shape[:-1], dtype=torch.bool)
        if len(layer.branches) == 2:
            if state.branch is not None:
                if name != state.branch:
                    continue
            else:
                member = state.image_mask if name == "image" else ~state.image_mask
        probs = layer.router(x).float().softmax(-1) if n > 1 else torch.ones(*x.shape[:-1], 1)
        for e, c in enumerate(columns):
            expert = x @ layer.lora_A[c : c + r].T @ layer.lora_B[:, c : c + r].T
            out = out + layer.scaling * (probs[..., e : e + 1] * member.unsqueeze(-1)) * expert
    return out


def standalone_layer(
    kind: str, mask: torch.Tensor, branch: str | None, expert_rank: str = "full"
) -> AdapterLinear:
    torch.manual_seed(3)
    config = AdapterConfig(
        kind=kind, dropout=0.0, num_experts=3, rank=6, alpha=6.0, expert_rank=expert_rank
    )
    routing = RoutingContext(config, image_token_ids=None)
    routing.state = RoutingState(enabled=True, branch=branch, image_mask=mask)
    layer = AdapterLinear(nn.Linear(16, 24), config, routing)
    nn.init.normal_(layer.lora_B)
    return layer


# "split" divides routed branches only: the kinds that have one.
KIND_RANKS = [(k, "full") for k in KINDS] + [("mode", "split"), ("moe-lora", "split")]


@pytest.mark.parametrize("branch", [None, "text", "image"])
@pytest.mark.parametrize(("kind", "expert_rank"), KIND_RANKS)
def test_stacked_layer_equals_expert_loop(kind, branch, expert_rank):
    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)
    layer = standalone_layer(kind, mask, branch, expert_rank)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
    upstream = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(5))
    results = []
    for forward in (layer, lambda x: loop_reference(layer, x, layer.routing.state)):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        out = forward(xi)
        (out * upstream).sum().backward()
        grads = [xi.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
        results.append([out.detach()] + [torch.zeros(()) if g is None else g for g in grads])
    assert not torch.allclose(results[0][0], layer.base(x))
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


# --- the fused path: the reference's floats ----------------------------------------------


def fused_case(kind, expert_rank="full", routing="token", training=True, pass_=None, **extra):
    return pytest.param(
        dict(kind=kind, expert_rank=expert_rank, routing=routing, **extra),
        training,
        pass_,
        id=f"{kind}-{expert_rank}-{routing}-{pass_}-{'train' if training else 'eval'}",
    )


# The kinds with a router: the fused path's (the others take the reference's ops).
ROUTED = [("mode", "full"), ("mode", "split"), ("moe-lora", "full"), ("moe-lora", "split")]
FUSED_CASES = [
    *(fused_case(kind, rank, training=t) for kind, rank in ROUTED for t in (True, False)),
    fused_case("cl-moe", "split", tasks=2),
    *(
        fused_case("mode", rank, routing=routing, training=training, pass_=pass_)
        for rank in ("full", "split")
        for routing in ("task", "sample")
        for pass_ in (None, "understand", "draw", "student")  # the teacher: no adapters
        for training in (True, False)
    ),
    fused_case("mode", dropout=0.0),
    fused_case("moe-lora", alpha=8.0),  # scaling 1
]


@pytest.mark.parametrize(("config", "training", "kind"), FUSED_CASES)
def test_fused_path_gives_the_reference_floats(config, training, kind):
    """Outputs, router weights and every gradient, bit for bit, whatever the kind, rank,
    policy, pass, dropout or scaling."""
    model = adapted("llama", **config).train(training)
    for layer in adapter_layers(model).values():
        if layer.router is not None:  # routers far from uniform: no path is trivially equal
            nn.init.normal_(layer.router.weight, std=0.5)
    model.get_input_embeddings().weight.requires_grad_(True)
    ids = batch()
    fused, reference = (step_results(model, f, ids, kind, None) for f in (True, False))
    assert len(fused) == len(reference)
    assert not torch.equal(fused[0], tiny_llama()(ids).logits)
    for ours, expected in zip(fused, reference, strict=True):
        assert torch.equal(ours, expected)


@pytest.mark.parametrize(
    ("host", "dtype", "config", "task"),
    [
        ("chameleon", torch.float32, dict(kind="mode"), None),
        ("llama", torch.bfloat16, dict(kind="mode"), None),
        ("llama", torch.bfloat16, dict(kind="moe-lora", expert_rank="split"), None),
        ("llama", torch.float32, dict(kind="cl-moe", tasks=3), 1),  # in training
    ],
)
def test_fused_path_gives_the_reference_floats_on_other_hosts(host, dtype, config, task):
    model = attach_adapters(HOSTS[host]().to(dtype), AdapterConfig(**config))
    randomize(model)
    model.train().get_input_embeddings().weight.requires_grad_(True)
    ids = batch()
    fused, reference = (step_results(model, f, ids, None, task) for f in (True, False))
    for ours, expected in zip(fused, reference, strict=True):
        assert ours.dtype == expected.dtype and torch.equal(ours, expected)


def test_fused_path_gives_the_reference_floats_with_cl_moe_task_gates():
    model = adapted("llama", kind="cl-moe", tasks=2, num_experts=3).train()
    routing = routing_context(model)
    routing.prototypes[0] = prompt_embedding(model, batch())[0]
    for layer in adapter_layers(model).values():
        layer.task_gates[0] = torch.tensor([0.2, 0.3, 0.5])
    model.get_input_embeddings().weight.requires_grad_(True)
    ids = batch()
    fused, reference = (step_results(model, f, ids, None, None) for f in (True, False))
    assert routing.state.task_ids is not None  # out of training: each sample's task gate
    for ours, expected in zip(fused, reference, strict=True):
        assert torch.equal(ours, expected)


@pytest.mark.parametrize(
    ("kind", "features", "branch", "rows", "out"),
    [
        ("moe-lora", 1, None, (1, 1), 24),  # a (1, 1) input of a product: column-major too
        ("moe-lora", 1, None, (2, 5), 24),
        ("mode", 16, "text", (1, 2048), 512),  # B's columns of a branch: not column-major
    ],
)
def test_fused_layer_gives_the_reference_floats_where_mm_backward_changes_form(
    kind, features, branch, rows, out
):
    """mm's backward picks its product's form by the strides: the fused backward the same
    (the other form rounds differently at 2048 tokens, where MKL splits the sum over two
    threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = fused_and_reference_layer(kind, features, branch, rows, out)
    finally:
        torch.set_num_threads(threads)
    for ours, expected in zip(*results, strict=True):
        assert torch.equal(ours, expected)


def fused_and_reference_layer(
    kind: str, features: int, branch: str | None, rows: tuple[int, int], out: int
) -> list[list[torch.Tensor]]:
    """Output and gradients of a standalone layer's step, by the fused and the reference path."""
    torch.manual_seed(3)
    config = AdapterConfig(kind=kind, rank=1, alpha=3.0, num_experts=2)
    routing = RoutingContext(config, image_token_ids=None)
    routing.state = RoutingState(branch=branch)  # one branch for every token
    layer = AdapterLinear(nn.Linear(features, out), config, routing).train()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(*rows, features, generator=torch.Generator().manual_seed(4))
    upstream = torch.randn(*rows, out, generator=torch.Generator().manual_seed(5))
    results = []
    for fused in (True, False):
        routing.fused = fused
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        torch.manual_seed(6)
        y = layer(xi)
        (y * upstream).sum().backward()
        grads = [layer.lora_A.grad, layer.lora_B.grad, layer.router.weight.grad]
        results.append([y, xi.grad, *grads])
    return results


def saved_for_backward(forward) -> list[torch.Tensor]:
    """The tensors autograd keeps for the backward of ``forward()``."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        forward()
    return saved


def test_fused_path_keeps_no_float32_copy_of_a_bfloat16_input_beyond_peft_loras():
    """Of the input's size, peft's LoRA keeps the dropout mask and the dropped-out float32
    input; the fused MoDE layer the mask and the input itself (the reference also the float32
    copy its router reads)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    base = nn.Linear(16, 24).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)
    config = AdapterConfig(kind="mode", num_experts=3)
    routing = RoutingContext(config, image_token_ids=None)
    routing.state = RoutingState(image_mask=mask)
    layer = AdapterLinear(base, config, routing).train()
    model = peft.get_peft_model(
        nn.Sequential(base), peft.LoraConfig(r=8, lora_dropout=0.05, target_modules=["0"])
    ).train()

    def input_sized(forward) -> list[torch.dtype]:
        return sorted(str(t.dtype) for t in saved_for_backward(forward) if t.numel() == x.numel())

    assert input_sized(lambda: model(x)) == ["torch.float32", "torch.float32"]
    assert input_sized(lambda: layer(x)) == ["torch.bfloat16", "torch.float32"]
    routing.fused = False
    assert input_sized(lambda: layer(x)) == ["torch.float32"] * 3


def test_autocast_takes_the_reference_path():
    """Under autocast the fused node steps aside: the same floats, fused on or off."""
    model = adapted("llama").train()
    ids = batch()
    with torch.autocast("cpu", torch.bfloat16):
        fused, reference = (step_results(model, f, ids, None, None) for f in (True, False))
    plain = step_results(model, True, ids, None, None)
    assert not torch.equal(fused[0], plain[0])  # autocast did run in bfloat16
    for ours, expected in zip(fused, reference, strict=True):
        assert torch.equal(ours, expected)


# --- gradient isolation ------------------------------------------------------------------


def grad_of(param: torch.Tensor, index: slice | tuple[slice, slice] = slice(None)) -> torch.Tensor:
    return torch.zeros(1) if param.grad is None else param.grad[index].flatten()


def branch_grads(layers: dict[str, AdapterLinear]) -> dict[str, torch.Tensor]:
    """The gradient of every branch's A and B, and of the router, over all layers."""
    grads: dict[str, list[torch.Tensor]] = {}
    for layer in layers.values():
        for name, cols in layer.columns.items():
            a, b = grad_of(layer.lora_A, cols), grad_of(layer.lora_B, (slice(None), cols))
            grads.setdefault(name, []).extend([a, b])
        if layer.router is not None:
            grads.setdefault("router", []).append(grad_of(layer.router.weight))
    return {name: torch.cat(parts) for name, parts in grads.items()}


@pytest.mark.parametrize("expert_rank", ["full", "split"])
def test_token_policy_branch_learns_only_from_its_tokens(expert_rank):
    """Changing the other branch's tokens (inputs and upstream gradient) changes nothing."""
    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)
    layer = standalone_layer("mode", mask, None, expert_rank)
    g = torch.Generator().manual_seed(6)
    x, upstream = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 24, generator=g)

    def grads_after(perturbed: torch.Tensor) -> dict[str, torch.Tensor]:
        layer.zero_grad()
        xi, up = x.clone(), upstream.clone()
        xi[perturbed] = torch.randn(int(perturbed.sum()), 16, generator=g)
        up[perturbed] = torch.randn(int(perturbed.sum()), 24, generator=g)
        (layer(xi) * up).sum().backward()
        return branch_grads({"layer": layer})

    reference = grads_after(torch.zeros_like(mask))
    image_changed, text_changed = grads_after(mask), grads_after(~mask)
    for name in ("text", "router"):
        assert torch.equal(image_changed[name], reference[name])
        assert not torch.equal(text_changed[name], reference[name])
    assert torch.equal(text_changed["image"], reference["image"])
    assert not torch.equal(image_changed["image"], reference["image"])


ALL = {"text", "image", "router"}
UNDERSTAND = {"text", "router"}


@pytest.mark.parametrize(
    ("policy", "kind", "training", "tokens", "learning"),
    [
        ("token", None, True, "text", UNDERSTAND),
        ("token", None, True, "image", {"image"}),
        ("token", None, True, "mixed", ALL),
        ("token", "understand", False, "mixed", ALL),
        ("token", "draw", True, "mixed", ALL),
        ("task", None, True, "mixed", ALL),
        ("task", "understand", True, "mixed", ALL),
        ("task", "understand", False, "mixed", UNDERSTAND),
        ("task", "draw", True, "mixed", {"image"}),
        ("task", "student", True, "mixed", {"image"}),
        ("sample", "understand", True, "mixed", UNDERSTAND),
        ("sample", "understand", False, "mixed", UNDERSTAND),
        ("sample", "draw", False, "mixed", {"image"}),
        ("sample", "student", True, "mixed", {"image"}),
    ],
)
def test_routing_policy_decides_which_branches_learn(policy, kind, training, tokens, learning):
    model = adapted("llama", routing=policy).train(training)
    ids = batch(tokens)
    with pass_kind(model, kind) if kind else nullcontext():
        logits = lm_logits(model, input_ids=ids)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for name, grad in branch_grads(adapter_layers(model)).items():
        # exactly zero, not small: the branch is untouched
        assert (torch.count_nonzero(grad) > 0) == (name in learning), name


def test_teacher_pass_and_adapters_off_are_the_host():
    model = tiny_llama()
    ids = batch()
    host = model(ids).logits
    attach_adapters(model, AdapterConfig(routing="sample"))
    randomize(model)
    student = model(ids).logits
    assert not torch.allclose(student, host, atol=1e-3)
    with adapters_off(model):
        assert torch.equal(model(ids).logits, host)
        with adapters_off(model):
            pass
        assert torch.equal(model(ids).logits, host)
    with pass_kind(model, "teacher"):
        assert torch.equal(model(ids).logits, host)
    with pass_kind(model, "student"):
        assert not torch.allclose(model(ids).logits, host, atol=1e-3)
    assert torch.equal(model(ids).logits, student)


# --- generation, inputs_embeds, lm_logits ------------------------------------------------


@pytest.mark.parametrize("host", ADAPTER_HOSTS)
def test_generate_with_cache_equals_greedy_recompute(host):
    model = adapted(host, std=1.0)
    model.generation_config.eos_token_id = None
    prompt = batch()
    new_tokens = 8
    generated = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=True)
    sequence = prompt
    for _ in range(new_tokens):
        following = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, following], dim=1)
    assert torch.equal(generated, sequence)
    with adapters_off(model):
        host_generated = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    assert not torch.equal(generated, host_generated)


def test_inputs_embeds_need_an_explicit_mask():
    model = adapted("llama")
    ids = batch()
    embeds = model.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=embeds)
    with image_mask_override(model, image_mask(ids, IMAGE_IDS)):
        from_embeds = model(inputs_embeds=embeds).logits
    assert torch.equal(from_embeds, model(ids).logits)
    model = adapted("llama", routing="sample")
    with pass_kind(model, "understand"):  # a forced branch needs no mask
        model(inputs_embeds=embeds)


@pytest.mark.parametrize("host", ADAPTER_HOSTS)
def test_lm_logits_are_the_forward_logits_without_the_image_mask(host):
    model = adapted(host)
    ids = batch()
    ours, forward = lm_logits(model, input_ids=ids), model(ids).logits
    assert torch.isfinite(ours).all()
    blocked = forward == torch.finfo(forward.dtype).min
    assert torch.equal(ours[~blocked], forward[~blocked])
    # Chameleon blocks its IMGIMG codes (not the markers); Llama blocks nothing
    expected_blocked = CODES if host == "chameleon" else []
    assert blocked.all(dim=(0, 1)).nonzero().flatten().tolist() == expected_blocked


# --- saving, counting, detaching, shares, errors -----------------------------------------


def test_save_load_round_trip(tmp_path):
    config = dict(num_experts=3, routing="sample", target_modules=("up_proj", "down_proj"))
    model = adapted("llama", **config)
    ids = batch()
    with pass_kind(model, "understand"):
        expected = model(ids).logits
    save_adapters(model, tmp_path)
    fresh = load_adapters(tiny_llama(), tmp_path)
    assert routing_context(fresh).config == AdapterConfig(**config)
    assert routing_context(fresh).image_token_ids == IMAGE_IDS
    with pass_kind(fresh, "understand"):
        assert torch.equal(fresh(ids).logits, expected)
    other = attach_adapters(tiny_llama(), AdapterConfig())
    with pytest.raises(ValueError, match="differ from saved"):
        load_adapters(other, tmp_path)


# tiny Llama, per layer: three linears with in+out = 80 each, router inputs 32+32+48
IN_OUT, ROUTER_IN = 2 * 3 * 80, 2 * 112


@pytest.mark.parametrize(
    ("kind", "expert_rank", "expected"),
    [
        ("mode", "full", {"text": 4 * 8 * IN_OUT, "image": 8 * IN_OUT, "router": 4 * ROUTER_IN}),
        ("lora", "full", {"shared": 8 * IN_OUT}),
        ("moe-lora", "full", {"shared": 4 * 8 * IN_OUT, "router": 4 * ROUTER_IN}),
        ("mode-text-lora", "full", {"text": 8 * IN_OUT, "image": 8 * IN_OUT}),
        # split: a routed branch of 4 experts of rank 2 has one rank-8 LoRA's parameters
        ("mode", "split", {"text": 8 * IN_OUT, "image": 8 * IN_OUT, "router": 4 * ROUTER_IN}),
        ("moe-lora", "split", {"shared": 8 * IN_OUT, "router": 4 * ROUTER_IN}),
    ],
)
def test_trainable_parameters_per_branch(kind, expert_rank, expected):
    model = attach_adapters(tiny_llama(), AdapterConfig(kind=kind, expert_rank=expert_rank))
    counts = trainable_parameters(model)
    assert counts == expected
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_detach_restores_the_host():
    model = tiny_llama()
    ids = batch()
    host, keys = model(ids).logits, set(model.state_dict())
    detach_adapters(adapted_model := attach_adapters(model, AdapterConfig()))
    assert adapted_model is model
    assert not has_adapters(model)
    assert set(model.state_dict()) == keys
    assert not adapter_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(model(ids).logits, host)
    model(inputs_embeds=model.get_input_embeddings()(ids))  # the routing hook is gone


@pytest.mark.parametrize(
    ("tokens", "kind", "routed"),
    [("mixed", None, True), ("image", None, False), ("mixed", "draw", False)],
)
def test_expert_shares_cover_routed_tokens_only(tokens, kind, routed):
    model = adapted("llama", routing="sample")
    with pass_kind(model, kind) if kind else nullcontext():
        model(batch(tokens))
    shares = expert_shares(model)
    assert bool(shares) == routed
    for share in shares.values():
        assert share.shape == (4,)
        torch.testing.assert_close(share.sum(), torch.tensor(1.0))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: AdapterConfig(rank=0), "rank must be positive"),
        (lambda: AdapterConfig(routing="random"), "unknown routing policy 'random'"),
        (lambda: AdapterConfig(kind="prompt"), "unknown adapter kind 'prompt'"),
        (lambda: AdapterConfig(num_experts=0), "num_experts must be at least 1"),
        (
            lambda: attach_adapters(tiny_llama(), AdapterConfig(target_modules=("fc1", "fc2"))),
            r"LlamaForCausalLM matches target_modules \['fc1', 'fc2'\]",
        ),
        (
            lambda: attach_adapters(LlamaForCausalLM(LlamaConfig(vocab_size=8, **SIZES, **HEADS))),
            "LlamaConfig defines no image tokens",
        ),
        (lambda: attach_adapters(adapted("llama")), "already has adapters"),
        (lambda: pass_kind(adapted("llama"), "review").__enter__(), "unknown pass kind 'review'"),
    ],
)
def test_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("kind", "routing", "accepted"),
    [
        ("mode", "task", True),
        ("mode", "sample", True),
        ("mode-text-lora", "task", True),
        ("mode-text-lora", "sample", True),
        ("lora", "task", False),
        ("lora", "sample", False),
        ("moe-lora", "task", False),
        ("moe-lora", "sample", False),
    ],
)
def test_routing_policies_need_a_kind_that_splits_modality(kind, routing, accepted):
    if accepted:
        assert AdapterConfig(kind=kind, routing=routing).routing == routing
        return
    expected = (
        f"routing: '{routing}' is only for kinds that split modality ('mode', 'mode-text-lora'); "
        f"kind '{kind}' has one branch, so routing must be 'token'"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        AdapterConfig(kind=kind, routing=routing)


@torch.no_grad()
def test_plain_lora_needs_no_image_tokens():
    """Given embeddings only (no ids, so no modality), plain LoRA adapts every token as it
    would given the ids: its one shared branch reads no image mask."""
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8, **SIZES, **HEADS)).eval()
    attach_adapters(model, AdapterConfig(kind="lora"))
    randomize(model)
    ids = torch.tensor([[1, 5, 2, 7]])
    embeds = model.get_input_embeddings()(ids)
    by_embeds = model(inputs_embeds=embeds).logits
    assert torch.allclose(by_embeds, model(input_ids=ids).logits, atol=1e-6)
    with adapters_off(model):
        assert not torch.allclose(by_embeds, model(inputs_embeds=embeds).logits, atol=1e-3)


@pytest.mark.parametrize("host", [*ADAPTER_HOSTS, "emu3"])
def test_left_padded_generation_equals_one_prompt_at_a_time(host):
    """Prompts of unequal length in one batch: the tokens each would get alone."""
    model = attach_adapters(HOSTS[host](), AdapterConfig(dropout=0.0))
    randomize(model, std=1.0)
    prompts = [row.tolist() for row in batch(rows=2)]
    prompts = [prompts[0], prompts[1][3:], prompts[0][5:]]  # lengths 12, 9, 7
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    together = generate(model, ids, 6, attention_mask=mask)
    for row, prompt in zip(together, prompts, strict=True):
        alone = generate(model, torch.tensor([prompt]), 6)[0]
        assert torch.equal(row, alone)
    unmasked = generate(model, ids, 6)  # the padding attended to: other tokens
    assert not torch.equal(unmasked, together)


def test_split_expert_rank_needs_a_rank_divisible_by_the_experts():
    with pytest.raises(ValueError, match="rank 6 is not divisible by it"):
        AdapterConfig(kind="moe-lora", rank=6, num_experts=4, expert_rank="split")
    with pytest.raises(ValueError, match="unknown expert_rank 'half'"):
        AdapterConfig(expert_rank="half")
    assert [AdapterConfig(expert_rank="split").expert_rank_of(n) for n in (1, 4)] == [8, 2]


@pytest.mark.parametrize(("kind", "experts"), [("lora", 4), ("mode-text-lora", 4), ("mode", 1)])
def test_split_expert_rank_on_a_kind_without_a_routed_branch_is_refused(kind, experts):
    with pytest.raises(
        ValueError,
        match=rf"expert_rank 'split' divides the rank among the experts of a routed branch; "
        rf"kind '{kind}' with num_experts {experts} has none: use 'full'",
    ):
        AdapterConfig(kind=kind, num_experts=experts, expert_rank="split")


def test_adapters_saved_as_split_on_an_unrouted_kind_load_as_full(tmp_path):
    model = attach_adapters(tiny_llama(), AdapterConfig(kind="lora"))
    save_adapters(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta | {"expert_rank": "split"}))
    load_adapters(model, tmp_path)  # as an earlier version saved seq-lora under "split"
    assert routing_context(model).config == AdapterConfig(kind="lora")


def test_router_entropy_is_one_for_a_uniform_router_and_zero_for_a_one_hot_one():
    weights = torch.tensor([[0.25] * 4, [0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(router_entropy(weights), torch.tensor([1.0, 0.0, 0.5]))


def test_routed_weights_are_the_routed_real_tokens_and_sum_to_one():
    model = adapted("llama", kind="mode", num_experts=3)
    ids = batch("mixed")
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[0, -2:] = False  # padding
    model(ids)
    routed = routed_weights(model, valid)
    text = ~image_mask(ids, IMAGE_IDS) & valid
    assert routed and all(w.shape == (int(text.sum()), 3) for w in routed.values())
    for weights in routed.values():
        torch.testing.assert_close(weights.sum(-1), torch.ones(len(weights)))


# --- per-task adapters (o-lora) and task gates (cl-moe) -------------------------------------


def expert_grads(layers: dict[str, AdapterLinear]) -> list[torch.Tensor]:
    """Each expert's gradient (its rows of A and columns of B) over all layers."""
    grads = []
    for e, rank in enumerate(next(iter(layers.values())).expert_ranks):
        cols = slice(e * rank, (e + 1) * rank)
        grads.append(
            torch.cat(
                [
                    part
                    for layer in layers.values()
                    for part in (
                        grad_of(layer.lora_A, cols),
                        grad_of(layer.lora_B, (slice(None), cols)),
                    )
                ]
            )
        )
    return grads


@pytest.mark.parametrize(
    ("kind", "task", "learning"),
    [
        ("o-lora", 0, {0}),  # later tasks' LoRAs left out
        ("o-lora", 1, {1}),  # task 0's frozen, task 2's left out
        ("o-lora", 2, {2}),  # both earlier ones frozen
        ("o-lora", None, {0, 1, 2}),  # out of training every LoRA adds up
        ("cl-moe", 0, {0, 1, 2}),  # one routed mixture for every task
        ("cl-moe", None, {0, 1, 2}),
    ],
)
def test_per_task_experts_learn_only_in_their_task(kind, task, learning):
    model = adapted("llama", kind=kind, tasks=3, num_experts=3).train()
    ids = batch("mixed")
    with training_task(model, task) if task is not None else nullcontext():
        logits = lm_logits(model, input_ids=ids)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    layers = adapter_layers(model)
    grads = expert_grads(layers)
    assert len(grads) == 3
    for e, grad in enumerate(grads):
        # exactly zero, not small: frozen or left out
        assert (torch.count_nonzero(grad) > 0) == (e in learning), e
    for layer in layers.values():
        assert layer.task_gates is None or not layer.task_gates.requires_grad


def test_o_lora_frozen_tasks_still_add_their_output():
    """While task 1 trains: task 0's LoRA adds its output (frozen), task 2's is left out."""
    model = adapted("llama", kind="o-lora", tasks=3)
    ids = batch()
    with training_task(model, 1):
        training = model(ids).logits
    everything = model(ids).logits
    assert not torch.allclose(training, everything, atol=1e-4)
    for layer in adapter_layers(model).values():
        layer.lora_B.data[:, 2 * layer.rank :] = 0  # task 2's LoRA untrained: B = 0
    torch.testing.assert_close(model(ids).logits, training, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="task 3 of a sequence of 3 tasks"):
        training_task(model, 3).__enter__()


def test_cl_moe_gate_mixes_the_instance_router_with_the_indexed_tasks_gate():
    """(1 - w) softmax(R x) + w task_gates[t], t each sample's own."""
    torch.manual_seed(3)
    config = AdapterConfig(
        kind="cl-moe", num_experts=3, rank=6, alpha=6.0, dropout=0.0, tasks=2, expert_rank="split"
    )
    routing = RoutingContext(config, image_token_ids=None)
    layer = AdapterLinear(nn.Linear(16, 24), config, routing)
    nn.init.normal_(layer.lora_B)
    layer.task_gates.copy_(torch.tensor([[0.0, 0.25, 0.75], [1.0, 0.0, 0.0]]))
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
    routing.state = RoutingState(task_ids=torch.tensor([1, 0]))
    out = layer(x)
    instance = layer.router(x).softmax(-1)
    gate = 0.5 * instance + 0.5 * layer.task_gates[torch.tensor([1, 0])][:, None]
    expected = layer.base(x)
    for e in range(3):
        cols = slice(2 * e, 2 * e + 2)
        expert = x @ layer.lora_A[cols].T @ layer.lora_B[:, cols].T
        expected = expected + layer.scaling * gate[..., e : e + 1] * expert
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    routing.state = RoutingState(task=0)  # in training: the instance router alone
    plain = layer.base(x) + layer.scaling * sum(
        instance[..., e : e + 1]
        * (x @ layer.lora_A[2 * e : 2 * e + 2].T @ layer.lora_B[:, 2 * e : 2 * e + 2].T)
        for e in range(3)
    )
    torch.testing.assert_close(layer(x), plain, rtol=1e-5, atol=1e-5)


def test_cl_moe_indexes_each_sample_by_the_nearest_trained_prototype():
    model = adapted("llama", kind="cl-moe", tasks=3, num_experts=2)
    routing = routing_context(model)
    ids = batch("mixed", rows=3)
    ids[1, :4], ids[1, 10:] = ids[2, :4], ids[2, 10:]  # rows 1 and 2: one text, two images
    rows = prompt_embedding(model, ids)
    # the text tokens only: image tokens do not move the embedding
    image = torch.tensor(IMAGE_IDS[:6])
    assert torch.equal(
        prompt_embedding(model, torch.cat([ids[:, :4], image.expand(3, 6)], dim=1)),
        prompt_embedding(model, ids[:, :4]),
    )
    model.eval()
    model(ids)
    assert routing.state.task_ids is None  # no task trained yet: no task gate
    routing.prototypes[0], routing.prototypes[2] = rows[2], rows[0]  # task 1 untrained
    model(ids)
    assert routing.state.task_ids.tolist() == [2, 0, 0]  # row 1: row 2's prompt
    # a cached decoding step keeps its prompt's tasks; training sets the task instead
    generate(model, ids, 3)
    assert routing.state.task_ids.tolist() == [2, 0, 0]
    with training_task(model, 1):
        model(ids)
    assert routing.state.task_ids is None and routing.state.task == 1


def test_cl_moe_task_gates_and_prototypes_are_saved_with_the_adapters(tmp_path):
    model = adapted("llama", kind="cl-moe", tasks=2, num_experts=2)
    routing = routing_context(model)
    routing.prototypes[0] = prompt_embedding(model, batch())[0]
    for layer in adapter_layers(model).values():
        layer.task_gates[0] = torch.tensor([0.3, 0.7])
    model.eval()
    expected = model(batch()).logits
    save_adapters(model, tmp_path)
    fresh = load_adapters(tiny_llama(), tmp_path)
    assert torch.equal(routing_context(fresh).prototypes, routing.prototypes)
    assert torch.equal(fresh(batch()).logits, expected)
