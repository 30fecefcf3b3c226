"""A few MoDE training steps on a tiny Chameleon, in one process or under torchrun.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT_DIR [METHOD]

Each process writes OUT_DIR/rank<R>.pt: its logged losses and its adapter weights.
`tests/test_distributed.py` runs it and compares with `train(None)` in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from modecl.core.adapters import adapter_state_dict, attach_adapters
from modecl.core.config import ContinualSettings, from_dict
from modecl.core.methods import get_method
from modecl.core.sequences import DrawPair
from modecl.core.tasks import Sample, Task
from modecl.core.train import train_task
from modecl.hosts.tasks import HostFormat
from tests.fixtures import CODES, tiny_chameleon, tokenizer

SETTINGS = from_dict(
    ContinualSettings,
    {
        # No dropout: its masks differ between processes, as in any data-parallel run.
        "adapter": {"dropout": 0.0, "rank": 4, "num_experts": 2},
        "train": {"epochs": 1, "batch_size": 6, "lr": 0.01},
        "distill": {"batch_size": 4, "top_k": 8},
        "monitor": {"enabled": False},
    },
)
# Answers of unequal length: a per-process mean would weight tokens differently.
ANSWERS = ["red", "blue green red", "a", "square circle", "b", "green"]


def train(accelerator, method_name: str = "mode") -> dict:
    """Task and KD losses of 3 steps of a method on 18 samples, adapters before and after."""
    model = tiny_chameleon()
    method = get_method(method_name)
    torch.manual_seed(0)
    attach_adapters(model, method.adapter_config(SETTINGS))
    fmt = HostFormat.from_model(model, tokenizer())
    g = torch.Generator().manual_seed(1)
    images = [tuple(CODES[i] for i in torch.randint(0, 16, (16,), generator=g)) for _ in range(18)]
    samples = [Sample(c, "what color is it ?", ANSWERS[i % 6]) for i, c in enumerate(images)]
    pairs = [DrawPair("draw red", c) for c in images]
    task = Task("colors", tuple(ANSWERS), samples, samples[:2])
    init = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    log = train_task(
        model,
        fmt,
        method,
        task,
        SETTINGS,
        draw_pairs=pairs,
        seed=3,
        progress=False,
        accelerator=accelerator,
    )
    trained = adapter_state_dict(model)
    kd = log["terms"].get("kd", [])
    return {"loss": log["loss"], "kd": kd, "init": init, "adapters": trained}


if __name__ == "__main__":
    from modecl.hosts.world import default_accelerator

    accelerator = default_accelerator()
    result = train(accelerator, *sys.argv[2:3])
    result |= {"world": accelerator.num_processes, "backend": str(accelerator.state.backend)}
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"rank{accelerator.process_index}.pt")
