"""Ops of one training step per adapter configuration: counts, not times, so any machine agrees.

One forward, cross entropy and backward of a small Llama stack (adapters on gate / up /
down_proj, a batch of text and image tokens; the embedding requires grad for every variant
alike, so that each backward runs through the whole stack), for: the frozen host, peft's LoRA
(r=8), and ours `lora`, `mode`, `mode` with split expert ranks, `moe-lora` and
`mode-text-lora`; those with a router also by the reference path ("ref.":
`RoutingContext.fused = False`, the same floats; the fused path is the default there, the
reference elsewhere). A variant's adapter-added count is its step's count minus the frozen
host's.

What is counted, every aten op that reaches the dispatcher below autograd in the step (a
`TorchDispatchMode`: forward, loss, backward and the gradients' accumulation, whatever
Python, autograd or a custom autograd function issued it; not the ops a kernel runs inside
itself, of which there are none here: on the CPU dropout is its four ops, for peft as for us):

- kernel ops: those that compute, which on a GPU each launch at least one kernel: all but
  views (ops whose output aliases an input: view, t, detach, expand, ...), `_unsafe_view`,
  `lift_fresh` and the allocations `empty*` (no kernel);
- all ops: every one of them, views included (each costs the host a dispatch);
- on CUDA also the kernels the GPU ran (torch.profiler's device events: kernels, memsets,
  copies);
- saved MiB: the bytes of the tensors autograd keeps for the backward (saved-tensor hooks,
  each storage once, parameters left out), another count that does not depend on the machine.

The count does not depend on the width (only memory does). The ratios are adapter-added
kernel ops over peft LoRA's; the last line is mode's:

    .venv/bin/python benchmarks/adapter_ops.py [--hidden 64 ...] [--dtype bfloat16] [--device cuda]

`mode_ops_over_peft_lora_ops=<ratio>` ends the output.
"""

from __future__ import annotations

import argparse
import collections
import copy
from collections.abc import Callable

import peft
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from modecl.core.adapters import AdapterConfig, attach_adapters, routing_context

TARGETS = ("gate_proj", "up_proj", "down_proj")
NO_KERNEL = {"_unsafe_view", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty"}
OURS = {
    "lora": AdapterConfig(kind="lora"),
    "mode": AdapterConfig(kind="mode"),
    "mode split": AdapterConfig(kind="mode", expert_rank="split"),
    "moe-lora": AdapterConfig(kind="moe-lora"),
    "mode-text-lora": AdapterConfig(kind="mode-text-lora"),
}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active: all, and those that launch kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.all: collections.Counter[str] = collections.Counter()
        self.kernels: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.all[name] += 1
        if not (func.is_view or name in NO_KERNEL):
            self.kernels[name] += 1
        return func(*args, **(kwargs or {}))


def host(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 16,
        num_key_value_heads=args.hidden // 16,
    )
    config.image_token_ids = list(range(args.vocab // 2, args.vocab))
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(args.dtype).train()
    model.requires_grad_(False)
    return model


def variants(args: argparse.Namespace) -> dict[str, nn.Module]:
    """The host and its adapted copies (B != 0, as after some training), sharing its weights."""
    base = host(args)

    def shared() -> nn.Module:
        return copy.deepcopy(base, memo={id(p): p for p in base.parameters()})

    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=list(TARGETS))
    models = {"frozen host": base, "peft LoRA r=8": peft.get_peft_model(shared(), lora)}
    for name, config in OURS.items():
        for fused in (True, False) if config.routed else (True,):
            model = attach_adapters(shared(), config)
            routing_context(model).fused = fused
            models[f"ours {name}" + ("" if fused else " (ref.)")] = model
    for model in models.values():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(param, std=0.01)
        model.get_input_embeddings().weight.requires_grad_(True)
    return models


def step(model: nn.Module, ids: torch.Tensor) -> None:
    logits = model(input_ids=ids).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    model.zero_grad(set_to_none=True)


def saved_bytes(model: nn.Module, run: Callable[[], None]) -> int:
    """Bytes of the tensors autograd saves during `run`, each storage once, no parameters."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def gpu_kernels(run: Callable[[], None]) -> int:
    """Device events (kernels, memsets, copies) the profiler records during `run`."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        run()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=176)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    args.device, args.dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = args.device.type == "cuda"

    # Each row: a text prompt (1/4), image tokens (1/2), text (1/4).
    g = torch.Generator().manual_seed(0)
    half = args.vocab // 2
    ids = torch.randint(0, half, (args.batch, args.seq), generator=g)
    image = slice(args.seq // 4, args.seq - args.seq // 4)
    codes = (args.batch, image.stop - image.start)
    ids[:, image] = torch.randint(half, args.vocab, codes, generator=g)
    ids = ids.to(args.device)

    counts: dict[str, tuple[int, ...]] = {}
    for name, model in variants(args).items():
        step(model, ids)  # warm-up: lazy initialisations happen once, outside the counts
        with OpCounter() as counter:
            step(model, ids)
        saved = saved_bytes(model, lambda m=model: step(m, ids))
        launched = gpu_kernels(lambda m=model: step(m, ids)) if cuda else 0
        counts[name] = (sum(counter.kernels.values()), sum(counter.all.values()), saved, launched)

    print(
        f"Llama: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"vocab {args.vocab}; batch x seq = {args.batch} x {args.seq} (half image tokens); "
        f"host {str(args.dtype).removeprefix('torch.')}, adapters float32, {args.device}; "
        "one training step; added = variant - frozen host"
    )
    header = f"{'variant':<24}{'kernel ops':>11}{'added':>7}{'/ peft':>8}"
    header += f"{'all ops':>9}{'added':>7}{'/ peft':>8}{'saved MiB':>11}{'added':>9}{'/ peft':>8}"
    print(header + (f"{'GPU kernels':>13}{'added':>7}{'/ peft':>8}" if cuda else ""))
    host_counts, peft_counts = counts["frozen host"], counts["peft LoRA r=8"]
    added = {n: [c - h for c, h in zip(v, host_counts, strict=True)] for n, v in counts.items()}
    peft_added = added["peft LoRA r=8"]
    widths = (11, 9, 11, 13)
    for name, values in counts.items():
        cells = []
        for i, value in enumerate(values[: 4 if cuda else 3]):
            extra = added[name][i]
            ratio = f"{extra / peft_added[i]:.2f}" if name != "frozen host" else "–"
            if i == 2:  # bytes
                cells.append(f"{value / 2**20:>11.3f}{extra / 2**20:>9.3f}{ratio:>8}")
            else:
                cells.append(f"{value:>{widths[i]}}{extra:>7}{ratio:>8}")
        print(f"{name:<24}" + "".join(cells))
    print(f"peft_lora_added_kernel_ops={peft_added[0]} (host {host_counts[0]}, {peft_counts[0]})")
    print(f"moe_lora_ops_over_peft_lora_ops={added['ours moe-lora'][0] / peft_added[0]:.3f}")
    print(f"mode_ops_over_peft_lora_ops={added['ours mode'][0] / peft_added[0]:.3f}")


if __name__ == "__main__":
    main()
