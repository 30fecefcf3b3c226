"""Adapter step time and memory at Anole-7B's geometry, and the distillation loss at its vocabulary.

A Llama stack of Anole-7B's width (hidden 4096, intermediate 11008, 32 heads, vocabulary
65,536, image codes 4..8195) with random weights and `--layers` decoder layers (default 2),
one sequence of a 1,024-code image and its question (1,100 tokens). Timed round-robin in one
process, on the same frozen host weights: the host alone, peft's LoRA (r=8 on gate / up /
down_proj), our `lora` and our `mode` (`modecl.core.adapters`), `mode` also by its reference
path ("ref.": `RoutingContext.fused = False`, the same floats by plain autograd ops; `lora`
has no router, so it takes the reference path anyway) and compiled ("compiled":
`compile_adapters`; its compiling step runs before anything is measured). A step is
forward, cross entropy and backward; the embedding output requires grad for every variant
alike, so each backward runs through the whole stack. Each variant reports the median step
(on CPU, this process's CPU time: other jobs on a shared machine barely change it), tokens/s
and its peak memory above what was resident before its warm-up step. First,
`modecl.core.distill.topk_kl` on [1, 1,100, 65,536] logits: its peak extra memory, forward
and backward, per chunk size.

    .venv/bin/python benchmarks/real_geometry.py                        # CPU, float32
    python benchmarks/real_geometry.py --layers 32 --device cuda        # one GPU, bfloat16

CPU memory is the resident set (VmHWM reset through /proc/self/clear_refs; while measuring,
glibc maps every block of 64 KiB or more, so freed tensors leave the resident set); CUDA
memory is torch's peak allocation. Adapters are float32 whatever the host's dtype. The last
lines are mode's extra peak memory (above the host's) and its adapter overhead (step time
above the host's), each over peft LoRA's: by the default (eager) path, then compiled. The CPU
run takes about 30 minutes on one thread (28 steps of ~50 s).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from modecl.core.adapters import (
    AdapterConfig,
    attach_adapters,
    compile_adapters,
    routing_context,
)
from modecl.core.distill import topk_kl

TARGETS = ("gate_proj", "up_proj", "down_proj")
CODES = range(4, 8196)  # Anole's image codes
MIB = 2**20
Clock = Callable[[], float]


class Memory:
    """Peak memory above the start of a measured span, on the CPU or a CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.libc = None if self.cuda else ctypes.CDLL("libc.so.6")

    def precise(self, on: bool) -> None:
        """CPU: on, glibc maps every block of 64 KiB or more and trims at once, so freed
        tensors leave the resident set (and every allocation faults its pages in); off, its
        steady state of the default (mapping from 32 MiB), for timing."""
        if self.libc is not None:
            self.libc.mallopt(-3, 64 * 2**10 if on else 32 * 2**20)  # M_MMAP_THRESHOLD
            self.libc.mallopt(-1, 0 if on else 64 * 2**20)  # M_TRIM_THRESHOLD

    def start(self) -> None:
        self.precise(True)
        if self.libc is not None:
            self.libc.malloc_trim(0)  # free heap pages leave the resident set, to fault back in
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base = self._status("VmRSS")

    def peak(self) -> int:
        """Bytes above the start, at the highest point since."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return self._status("VmHWM") - self.base

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)


def host(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=65536,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        attn_implementation="sdpa",
    )
    config.image_token_ids = list(CODES)
    with torch.device(args.device):  # built in place, in its dtype
        model = AutoModelForCausalLM.from_config(config, dtype=args.dtype).train()
    model.requires_grad_(False)
    return model


def variants(base: LlamaForCausalLM) -> dict[str, nn.Module]:
    """The host and its adapted copies, all sharing the host's (frozen) weights."""

    def shared() -> nn.Module:
        return copy.deepcopy(base, memo={id(p): p for p in base.parameters()})

    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=list(TARGETS))
    models = {"frozen host": base, "peft LoRA r=8": peft.get_peft_model(shared(), lora)}
    models["ours lora"] = attach_adapters(shared(), AdapterConfig(kind="lora"))
    for path in ("", " (ref.)", " (compiled)"):
        model = attach_adapters(shared(), AdapterConfig(kind="mode"))
        routing_context(model).fused = path != " (ref.)"
        compile_adapters(model, path == " (compiled)")
        models[f"ours mode{path}"] = model
    for model in models.values():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B != 0 as after some training: no path is trivially zero
                nn.init.normal_(param, std=0.01)
        embedding = model.get_input_embeddings()
        embedding.register_forward_hook(lambda module, i, out: out.detach().requires_grad_())
    return models


def step(model: nn.Module, ids: torch.Tensor, sync: Callable[[], None], clock: Clock) -> float:
    start = clock()
    logits = model(input_ids=ids).logits
    F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).backward()
    model.zero_grad(set_to_none=True)
    sync()
    return clock() - start


def sequence(args: argparse.Namespace) -> torch.Tensor:
    """BOS, a 38-token prompt, 1,024 image codes, a 37-token question: 1,100 ids."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(CODES.stop, 65536, (75,), generator=g)
    image = torch.randint(CODES.start, CODES.stop, (1024,), generator=g)
    ids = torch.cat([torch.tensor([1]), text[:38], image, text[38:]])
    return ids[None].to(args.device)


def distillation(
    args: argparse.Namespace, memory: Memory, positions: int, dtype: str, clock: Clock
) -> None:
    vocab, k = 65536, 256
    g = torch.Generator(args.device).manual_seed(0)
    shape = (1, positions, vocab)
    teacher = torch.randn(shape, generator=g, device=args.device, dtype=args.dtype)
    student = torch.randn(shape, generator=g, device=args.device, dtype=args.dtype)
    student.requires_grad_(True)
    topk_kl(teacher, student, top_k=k, chunk_size=args.kd_chunks[0]).backward()  # first use
    student.grad = None
    size = torch.finfo(args.dtype).bits // 8
    print(
        f"topk_kl, logits [1, {positions}, {vocab}] {dtype} "
        f"({positions * vocab * size / MIB:.0f} MiB each), top-K {k}"
    )
    print(
        f"{'chunk':>6}{'forward s':>11}{'peak fwd MiB':>14}{'peak fwd+bwd MiB':>18}"
        f"{'chunk x V MiB':>15}{'P x K x 4 MiB':>15}"
    )
    for chunk in args.kd_chunks:
        memory.start()
        start = clock()
        loss = topk_kl(teacher, student, top_k=k, chunk_size=chunk)
        forward_s = clock() - start
        forward = memory.peak()
        loss.backward()
        both = memory.peak()
        student.grad = None
        print(
            f"{chunk:>6}{forward_s:>11.2f}{forward / MIB:>14.0f}{both / MIB:>18.0f}"
            f"{chunk * vocab * size / MIB:>15.0f}{positions * k * 4 / MIB:>15.1f}"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="host weights")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--kd-chunks", type=int, nargs="+", default=[128, 1024])
    args = parser.parse_args()
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    torch.set_num_threads(args.threads)
    memory = Memory(args.device)
    dtype = str(args.dtype).removeprefix("torch.")
    # CPU: this process's CPU time, which the other jobs of a shared machine barely change.
    clock = time.perf_counter if cuda else time.process_time

    ids = sequence(args)
    distillation(args, memory, ids.shape[1], dtype, clock)
    base = host(args)
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    models = variants(base)
    sync = torch.cuda.synchronize if cuda else lambda: None
    times: dict[str, list[float]] = {name: [] for name in models}
    peaks: dict[str, int] = {}
    for name, model in models.items():  # warm-up, and each variant's peak memory
        if name.endswith("(compiled)"):  # compiling: once, before anything is measured
            step(model, ids, sync, clock)
            if not routing_context(model).compiled:
                raise SystemExit(f"{name}: torch.compile failed (see the warning)")
        memory.start()
        step(model, ids, sync, clock)
        peaks[name] = memory.peak()
    memory.precise(False)
    for _ in range(args.steps):
        for name, model in models.items():
            times[name].append(step(model, ids, sync, clock))

    medians = {name: statistics.median(t) for name, t in times.items()}
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if cuda else f"CPU time, {threads} thread(s)"
    print(
        f"Anole-7B width (hidden 4096, intermediate 11008, 32 heads, vocab 65536), "
        f"{args.layers} layers, host {dtype} ({weights / 2**30:.2f} GiB, shared by every "
        f"variant), adapters float32; 1 x {ids.shape[1]} tokens; {where}; "
        f"median of {args.steps} steps"
    )
    print(
        f"{'variant':<22}{'trainable':>11}{'step s':>9}{'tokens/s':>10}{'x host':>8}"
        f"{'overhead / peft':>17}{'peak step MiB':>15}{'extra / peft':>14}"
    )
    host_s, host_peak = medians["frozen host"], peaks["frozen host"]
    peft_overhead = medians["peft LoRA r=8"] - host_s
    peft_extra = peaks["peft LoRA r=8"] - host_peak
    for name, model in models.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        overhead = "–" if model is base else f"{(medians[name] - host_s) / peft_overhead:.2f}"
        extra = "–" if model is base else f"{(peaks[name] - host_peak) / peft_extra:.2f}"
        print(
            f"{name:<22}{trainable:>11,}{medians[name]:>9.2f}{ids.shape[1] / medians[name]:>10.0f}"
            f"{medians[name] / host_s:>8.3f}{overhead:>17}{peaks[name] / MIB:>15.0f}{extra:>14}"
        )
    for path, label in (("", "eager_"), (" (compiled)", "")):
        extra = (peaks[f"ours mode{path}"] - host_peak) / peft_extra
        print(f"mode_{label}extra_memory_over_peft_lora_extra={extra:.3f}")
        overhead = (medians[f"ours mode{path}"] - host_s) / peft_overhead
        print(f"mode_{label}overhead_over_peft_lora_overhead={overhead:.3f}")


if __name__ == "__main__":
    main()
