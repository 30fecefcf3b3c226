"""A few MoDE training steps on a tiny Chameleon, in one process or under torchrun.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT_DIR [METHOD]

DDP, or DeepSpeed ZeRO with ``ACCELERATE_USE_DEEPSPEED=true`` (docs/scale-out.md). The
steps run twice: once writing a step checkpoint after every step, then again resuming from
the last one, which trains the last step only. Each process writes OUT_DIR/rank<R>.pt: its
engine, its logged losses and gradient norms, its adapter weights, and those the resumed
run ended with. `tests/test_distributed.py` runs it and compares with `train(None)` in one
process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from modecl.core.adapters import adapter_state_dict, attach_adapters
from modecl.core.config import ContinualSettings, from_dict
from modecl.core.methods import get_method
from modecl.core.processes import Processes, zero_stage
from modecl.core.sequences import DrawPair
from modecl.core.tasks import Sample, Task
from modecl.core.train import check_engine, train_task
from modecl.hosts.tasks import HostFormat
from tests.fixtures import CODES, tiny_chameleon, tokenizer

SETTINGS = from_dict(
    ContinualSettings,
    {
        # No dropout: its masks differ between processes, as in any data-parallel run.
        "adapter": {"dropout": 0.0, "rank": 4, "num_experts": 2},
        # Clipping binds (gradient norms 0.14 to 0.29): a run that clips at another norm
        # ends with other adapters.
        "train": {
            "epochs": 1,
            "batch_size": 6,
            "lr": 0.01,
            "grad_clip": 0.1,
            "checkpoint_every": 1,
        },
        "distill": {"batch_size": 4, "top_k": 8},
        "monitor": {"enabled": False},
    },
)
# Answers of unequal length: a per-process mean would weight tokens differently.
ANSWERS = ["red", "blue green red", "a", "square circle", "b", "green"]


def train(accelerator, method_name: str = "mode", checkpoint: Path | None = None) -> dict:
    """Task and KD losses and gradient norms of 3 steps of a method on 18 samples, adapters
    before and after; with a `checkpoint` folder, a step checkpoint after every step, or a
    resume from the one there."""
    model = tiny_chameleon()
    method = get_method(method_name)
    check_engine(accelerator, SETTINGS, [method])  # the run's pre-flight
    torch.manual_seed(0)
    attach_adapters(model, method.adapter_config(SETTINGS))
    fmt = HostFormat.from_model(model, tokenizer())
    g = torch.Generator().manual_seed(1)
    images = [tuple(CODES[i] for i in torch.randint(0, 16, (16,), generator=g)) for _ in range(18)]
    samples = [Sample(c, "what color is it ?", ANSWERS[i % 6]) for i, c in enumerate(images)]
    pairs = [DrawPair("draw red", c) for c in images]
    task = Task("colors", tuple(ANSWERS), samples, samples[:2])
    method.configure(SETTINGS, pairs)
    init = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    norms: list[float] = []
    log = train_task(
        model,
        fmt,
        method,
        task,
        SETTINGS,
        seed=3,
        progress=False,
        processes=Processes(accelerator),
        on_step=lambda step, values: norms.append(values["grad_norm"]),
        checkpoint=checkpoint,
    )
    trained = adapter_state_dict(model)
    kd = log["terms"].get("kd", [])
    return {"loss": log["loss"], "kd": kd, "norms": norms, "init": init, "adapters": trained}


if __name__ == "__main__":
    from modecl.hosts.world import default_accelerator

    accelerator = default_accelerator()
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    result = train(accelerator, *sys.argv[2:3], checkpoint=out / "steps")
    resumed = train(accelerator, *sys.argv[2:3], checkpoint=out / "steps")
    result |= {
        "resumed": {"loss": resumed["loss"], "adapters": resumed["adapters"]},
        "processes": accelerator.num_processes,
        "backend": str(accelerator.state.backend),
        "engine": accelerator.distributed_type.value,
        "zero_stage": zero_stage(accelerator),
    }
    torch.save(result, out / f"rank{accelerator.process_index}.pt")
