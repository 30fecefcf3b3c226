"""Training-step time of the adapter configurations on a Llama-geometry stack (CPU, float32).

Compares, in one run and on the same frozen host: the host alone, peft's LoRA (r=8), our
`lora`, our `mode` (N=4, per-token routing over a batch of text and image tokens), and with
`--naive` a MoDE that loops over its experts in Python, as published MoE-LoRA code does, and
with `--reference` our `mode` by the reference path (`RoutingContext.fused = False`: the
same floats by plain autograd ops; our `lora`, without a router, takes it anyway). `--tiny`
shrinks the stack to hidden 64 and 2 x 32 tokens, where a step is the host's work of
dispatching its ops, as a GPU step at batch 1 is launch-bound. A step is forward +
cross-entropy + backward, timed in this process's CPU time (one thread: waiting for a core
shared with other jobs does not count). The variants take turns, one step each per round; a
variant's overhead in a round is its step minus the host's step of that round, and each
figure is the median over the rounds, so that slow spells of a shared machine (memory
bandwidth, caches) cancel out of the differences.

    .venv/bin/python benchmarks/adapter_speed.py [--quick | --tiny] [--steps N] [--naive]
        [--reference]

The last line is `mode_overhead_over_peft_lora_overhead=<ratio>` (median overheads).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import peft
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from modecl.core.adapters import AdapterConfig, attach_adapters, routing_context

TARGETS = ("gate_proj", "up_proj", "down_proj")


class LoopMoDELinear(nn.Module):
    """MoDE written the naive way: one module per expert, a Python loop over the experts."""

    def __init__(self, base: nn.Linear, mask: torch.Tensor, experts: int = 4, rank: int = 8):
        super().__init__()
        self.base, self.mask, self.scaling = base, mask, 16 / rank

        def lora() -> nn.Sequential:
            a, b = (
                nn.Linear(base.in_features, rank, bias=False),
                nn.Linear(rank, base.out_features, bias=False),
            )
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.normal_(b.weight, std=0.01)
            return nn.Sequential(nn.Dropout(0.05), a, b)

        self.text = nn.ModuleList(lora() for _ in range(experts))
        self.image = lora()
        self.router = nn.Linear(base.in_features, experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.router(x).float().softmax(-1).to(x.dtype)
        text = sum(weights[..., e : e + 1] * expert(x) for e, expert in enumerate(self.text))
        adapter = torch.where(self.mask.unsqueeze(-1), self.image(x), text)
        return self.base(x) + self.scaling * adapter


def host(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 2),
        num_key_value_heads=max(args.hidden // 64, 2),
        attn_implementation="sdpa",
    )
    config.image_token_ids = list(range(args.vocab // 2, args.vocab))
    model = LlamaForCausalLM(config).train()
    model.requires_grad_(False)
    return model


def nonzero_b(model: nn.Module) -> nn.Module:
    """B != 0 as after some training, so no path is trivially zero."""
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.01)
    return model


def variants(args: argparse.Namespace, mask: torch.Tensor) -> dict[str, nn.Module]:
    base = host(args)
    peft_config = peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=list(TARGETS)
    )
    models = {
        "host": base,
        "peft lora": peft.get_peft_model(copy.deepcopy(base), peft_config),
        "ours lora": attach_adapters(copy.deepcopy(base), AdapterConfig(kind="lora")),
        "ours mode": attach_adapters(copy.deepcopy(base), AdapterConfig(kind="mode")),
    }
    if args.reference:
        models["ours mode (ref.)"] = attach_adapters(copy.deepcopy(base), AdapterConfig())
        routing_context(models["ours mode (ref.)"]).fused = False
    if args.naive:
        naive = copy.deepcopy(base)
        for name, module in list(naive.named_modules()):
            if name.rsplit(".", 1)[-1] in TARGETS:
                parent, _, child = name.rpartition(".")
                setattr(naive.get_submodule(parent), child, LoopMoDELinear(module, mask))
        models["naive loop mode"] = naive
    for model in models.values():
        nonzero_b(model).train()
        # The host alone needs something to differentiate: the embeddings, for every variant
        # alike, so that each backward runs through the whole stack.
        model.get_input_embeddings().weight.requires_grad_(True)
    return models


def step(model: nn.Module, ids: torch.Tensor) -> float:
    start = time.process_time()
    logits = model(input_ids=ids).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    model.zero_grad(set_to_none=True)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small stack, for a smoke run")
    size.add_argument("--tiny", action="store_true", help="hidden 64: the host's dispatch work")
    parser.add_argument("--steps", type=int, default=15, help="timed rounds")
    parser.add_argument("--naive", action="store_true", help="also the per-expert loop MoDE")
    parser.add_argument("--reference", action="store_true", help="also mode's reference path")
    # One thread by default: on a shared machine, OpenMP threads stall whenever another
    # process holds one of their cores, which swamps the differences measured here.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = (1024, 2816, 4, 2048, 8, 256)
    size = (
        (256, 704, 2, 512, 4, 128)
        if args.quick
        else (64, 176, 2, 256, 2, 32)
        if args.tiny
        else size
    )
    args.hidden, args.intermediate, args.layers, args.vocab, batch, seq = size

    # Each row: text prompt (1/8), image tokens (3/4), text (1/8).
    g = torch.Generator().manual_seed(0)
    half = args.vocab // 2
    ids = torch.randint(0, half, (batch, seq), generator=g)
    image = slice(seq // 8, seq - seq // 8)
    ids[:, image] = torch.randint(half, args.vocab, (batch, image.stop - image.start), generator=g)
    models = variants(args, ids >= half)

    times: dict[str, list[float]] = {name: [] for name in models}
    for name in models:  # warm-up
        step(models[name], ids)
    for _ in range(args.steps):
        for name in models:
            times[name].append(step(models[name], ids))

    host_step = statistics.median(times["host"])
    overheads = {
        name: statistics.median(t - h for t, h in zip(times[name], times["host"], strict=True))
        for name in models
    }
    print(
        f"hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"vocab {args.vocab}, batch x seq = {batch} x {seq}, float32, "
        f"{torch.get_num_threads()} thread(s), CPU time, medians over {args.steps} rounds"
    )
    print(f"{'variant':<20}{'step s':>10}{'overhead s':>12}{'x host':>9}{'overhead / peft':>17}")
    for name, overhead in overheads.items():
        step_s = statistics.median(times[name])
        ratio = overhead / overheads["peft lora"]
        print(f"{name:<20}{step_s:>10.4g}{overhead:>12.4g}{step_s / host_step:>9.3f}{ratio:>17.2f}")
    ratio = overheads["ours mode"] / overheads["peft lora"]
    print(f"mode_overhead_over_peft_lora_overhead={ratio:.3f}")


if __name__ == "__main__":
    main()
