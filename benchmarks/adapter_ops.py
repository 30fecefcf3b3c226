"""Ops of one training step per adapter configuration: counts, not times, so any machine agrees.

One forward, cross entropy and backward of a small Llama stack (adapters on gate / up /
down_proj, a batch of text and image tokens; the embedding requires grad for every variant
alike, so that each backward runs through the whole stack), for: the frozen host, peft's LoRA
(r=8), and ours `lora`, `mode`, `mode` with split expert ranks, `moe-lora` and
`mode-text-lora` by their default (eager) path; those with a router also by the reference
path ("ref.": `RoutingContext.fused = False`, the same floats); those with a gate (a router
or two branches) also compiled ("compiled": `compile_adapters`, inductor's kernels). A
variant's adapter-added count is its step's count minus the frozen host's.

What is counted, from torch.profiler's record of the step (forward, loss, backward and the
gradients' accumulation, whatever Python, autograd, a custom autograd function or a compiled
graph issued it): each aten op the dispatcher ran, taken whole (not the ops its kernel calls
inside itself), except those that only decompose into others (`linear` and `dropout` count as
the ops they run: on the CPU dropout is bernoulli_, div_ and mul, for peft as for us), and each
kernel a compiled graph runs (inductor's fused C++ kernels, recorded by
`torch._inductor.config.cpp.enable_kernel_profile`; its matmuls are aten ops):

- kernel ops: those that compute, which on a GPU each launch at least one kernel: all but
  views (ops whose output aliases an input: view, t, detach, expand, ...), `_unsafe_view`,
  `lift_fresh` and the allocations `empty*` (no kernel);
- all ops: every one of them, views included (each costs the host a dispatch);
- on CUDA also the kernels the GPU ran (torch.profiler's device events: kernels, memsets,
  copies; a compiled graph's Triton kernels are counted there only);
- saved MiB: the bytes of the tensors autograd keeps for the backward (saved-tensor hooks,
  each storage once, parameters left out), another count that does not depend on the machine.

The count does not depend on the width (only memory does). The ratios are adapter-added
kernel ops over peft LoRA's; the last two lines are the fused path's (compiled, the
`compile_adapters` switch), moe-lora's and mode's:

    .venv/bin/python benchmarks/adapter_ops.py [--hidden 64 ...] [--dtype bfloat16] [--device cuda]

`mode_ops_over_peft_lora_ops=<ratio>` ends the output.
"""

from __future__ import annotations

import argparse
import copy
import functools
from collections.abc import Callable

import peft
import torch
import torch._inductor.config
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from modecl.core.adapters import AdapterConfig, attach_adapters, compile_adapters, routing_context

TARGETS = ("gate_proj", "up_proj", "down_proj")
NO_KERNEL = {"_unsafe_view", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty"}
OURS = {
    "lora": AdapterConfig(kind="lora"),
    "mode": AdapterConfig(kind="mode"),
    "mode split": AdapterConfig(kind="mode", expert_rank="split"),
    "moe-lora": AdapterConfig(kind="moe-lora"),
    "mode-text-lora": AdapterConfig(kind="mode-text-lora"),
}
IMPLICIT = torch._C.DispatchKey.CompositeImplicitAutograd


@functools.cache
def _overloads(name: str) -> tuple[torch._ops.OpOverload, ...]:
    packet = getattr(torch.ops.aten, name, None)
    found = []
    for overload in packet.overloads() if packet is not None else ():
        try:
            op = getattr(packet, overload)
            op.has_kernel_for_dispatch_key(IMPLICIT)  # some overloads are not registered
        except RuntimeError:
            continue
        found.append(op)
    return tuple(found)


def _decomposes(name: str) -> bool:
    """Whether every overload of aten op `name` only runs other ops (linear, dropout, ...)."""
    ops = _overloads(name)
    return bool(ops) and all(op.has_kernel_for_dispatch_key(IMPLICIT) for op in ops)


def _no_kernel(name: str) -> bool:
    ops = _overloads(name)
    return name in NO_KERNEL or (bool(ops) and all(op.is_view for op in ops))


def count_ops(run: Callable[[], None]) -> tuple[int, int]:
    """(kernel ops, all ops) of `run`, as the module doc counts them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    counts = [0, 0]

    def visit(event) -> None:
        name = event.name
        if "cpp_fused" in name:  # a compiled graph's kernel
            counts[0] += 1
            counts[1] += 1
        elif name.startswith("aten::") and not _decomposes(name[6:]):
            counts[0] += not _no_kernel(name[6:])
            counts[1] += 1
        else:
            for child in event.cpu_children:
                visit(child)

    for event in prof.events():
        if event.cpu_parent is None:
            visit(event)
    return counts[0], counts[1]


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
        paths = [""] + [" (ref.)"] * config.routed
        paths += [" (compiled)"] * (config.routed or config.splits_modality)
        for path in paths:
            model = attach_adapters(shared(), config)
            routing_context(model).fused = path != " (ref.)"
            compile_adapters(model, path == " (compiled)")
            models[f"ours {name}{path}"] = model
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

    torch._inductor.config.cpp.enable_kernel_profile = True  # before anything compiles
    counts: dict[str, tuple[int, ...]] = {}
    for name, model in variants(args).items():
        step(model, ids)  # warm-up: lazy initialisations (and compiling) happen once
        if name.endswith("(compiled)") and not routing_context(model).compiled:
            raise SystemExit(f"{name}: torch.compile failed (see the warning), no count")
        kernels, everything = count_ops(lambda m=model: step(m, ids))
        saved = saved_bytes(model, lambda m=model: step(m, ids))
        launched = gpu_kernels(lambda m=model: step(m, ids)) if cuda else 0
        counts[name] = (kernels, everything, saved, launched)

    print(
        f"Llama: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"vocab {args.vocab}; batch x seq = {args.batch} x {args.seq} (half image tokens); "
        f"host {str(args.dtype).removeprefix('torch.')}, adapters float32, {args.device}; "
        "one training step; added = variant - frozen host"
    )
    header = f"{'variant':<32}{'kernel ops':>11}{'added':>7}{'/ peft':>8}"
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
        print(f"{name:<32}" + "".join(cells))
    print(f"peft_lora_added_kernel_ops={peft_added[0]} (host {host_counts[0]}, {peft_counts[0]})")
    for kind in ("moe-lora", "mode"):
        ratio = added[f"ours {kind}"][0] / peft_added[0]
        print(
            f"{kind.replace('-', '_')}_eager_ops_over_peft_lora_ops={ratio:.3f} (the default path)"
        )
    print("compiled (compile_adapters, host.compile_adapters = true):")
    for kind in ("moe-lora", "mode"):
        ratio = added[f"ours {kind} (compiled)"][0] / peft_added[0]
        print(f"{kind.replace('-', '_')}_ops_over_peft_lora_ops={ratio:.3f}")


if __name__ == "__main__":
    main()
