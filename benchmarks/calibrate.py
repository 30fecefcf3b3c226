"""Choose the shared training recipe once, with seq-lora only (never tuned per method).

For each (lr, epochs, batch size) in a small grid, train seq-lora through the default
sequence and print the accuracy on each task right after training it (the diagonal
R[i][i]); the recipe in configs/digits.toml is the best shared setting found here. With
``--floor F`` it also names the gentlest setting that still learns every task: each task
at F or above, or, on a task where the config's own schedule (which must be in the grid)
stays below F, at that schedule's accuracy or above. Gentlest: the smallest epochs x lr
(the sum of the peak step sizes over a task), then the fewest epochs; this is the gentle
schedule of configs/regimes/gentle.toml.

    .venv/bin/python benchmarks/calibrate.py [--config configs/digits.toml] [--floor 0.75]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time

from modecl.core.adapters import attach_adapters
from modecl.core.config import load_toml
from modecl.core.evaluate import exact_accuracy
from modecl.core.methods import get_method
from modecl.core.train import train_task
from modecl.digits.config import RunConfig
from modecl.digits.pretrain import load_or_pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/digits.toml")
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--epochs", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32])
    parser.add_argument(
        "--floor", type=float, help="name the gentlest setting that still learns every task"
    )
    args = parser.parse_args()
    base = load_toml(RunConfig, args.config)
    host = load_or_pretrain(base.host)
    tasks = host.world.tasks(base.tasks)
    print(
        "lr      epochs batch | "
        + " ".join(f"{t.name[:10]:>10}" for t in tasks)
        + " |   min  seconds"
    )
    diagonals = {}
    for lr, epochs, batch in itertools.product(args.lr, args.epochs, args.batch_size):
        config = copy.deepcopy(base.continual)
        config.train.lr, config.train.epochs, config.train.batch_size = lr, epochs, batch
        method = get_method("seq-lora")
        model = copy.deepcopy(host.model)
        attach_adapters(model, method.adapter_config(config))
        start, diagonal = time.perf_counter(), []
        for k, task in enumerate(tasks):
            train_task(model, host.world.format, method, task, config, seed=k, progress=False)
            diagonal.append(exact_accuracy(model, host.world.format, task.test))
        diagonals[epochs, lr, batch] = diagonal
        cells = " ".join(f"{a:>10.3f}" for a in diagonal)
        print(
            f"{lr:<7g} {epochs:>6} {batch:>5} | {cells} | {min(diagonal):.3f} "
            f"{time.perf_counter() - start:8.0f}",
            flush=True,
        )
    if args.floor is not None:
        train = base.continual.train
        own = diagonals.get((train.epochs, train.lr, train.batch_size))
        if own is None:
            parser.error("--floor needs the config's own schedule in the grid")
        floors = [min(args.floor, a) for a in own]
        print("floors: " + " ".join(f"{f:.3f}" for f in floors))
        passing = [
            s for s, d in diagonals.items() if all(a >= f for a, f in zip(d, floors, strict=True))
        ]
        epochs, lr, batch = min(passing, key=lambda s: (s[0] * s[1], s[0]))
        print(f"gentlest that still learns every task: epochs {epochs} lr {lr:g} batch {batch}")


if __name__ == "__main__":
    main()
