"""Choose the shared training recipe once, with seq-lora only (never tuned per method).

For each (lr, epochs, batch size) in a small grid, train seq-lora through the default
sequence and print the accuracy on each task right after training it (the diagonal
R[i][i]); the recipe in configs/digits.toml is the best shared setting found here. With
``--floor F`` it also names the gentlest setting that still learns every task: each task
at F or above, or, on a task where the config's own schedule (which must be in the grid)
stays below F, at that schedule's accuracy or above. Gentlest: the smallest epochs x lr
(the sum of the peak step sizes over a task), then the fewest epochs; this is the gentle
schedule of configs/regimes/gentle.toml. With ``--optimizer sgd`` (or ``sgd-momentum``) the
grid trains with that optimizer, and ``--match`` names the lr whose mean accuracy right
after each task comes closest to AdamW's at the config's own recipe (trained first, as the
reference): the optimizer study's matched learning rate (configs/optimizers/).

    .venv/bin/python benchmarks/calibrate.py [--config configs/digits.toml] [--floor 0.75]
    .venv/bin/python benchmarks/calibrate.py --optimizer sgd --lr 0.1 0.3 1 3 --epochs 10 --match
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time

import torch

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
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "sgd-momentum"])
    parser.add_argument(
        "--match", action="store_true", help="name the lr whose mean accuracy matches AdamW's"
    )
    args = parser.parse_args()
    base = load_toml(RunConfig, args.config)
    host = load_or_pretrain(base.host)
    tasks = host.digits.tasks(base.tasks)
    print(
        "optimizer    lr      epochs batch | "
        + " ".join(f"{t.name[:10]:>10}" for t in tasks)
        + " |   min   mean  seconds"
    )

    def diagonal(optimizer: str, lr: float, epochs: int, batch: int) -> list[float]:
        """seq-lora's accuracy on each task right after training it, printed as a row."""
        config = copy.deepcopy(base.continual)
        train = config.train
        train.optimizer, train.lr, train.epochs, train.batch_size = optimizer, lr, epochs, batch
        method = get_method("seq-lora")
        model = copy.deepcopy(host.model)
        torch.manual_seed(0)  # the adapters' init: torch seeds itself at random at start-up
        attach_adapters(model, method.adapter_config(config))
        start, row = time.perf_counter(), []
        for k, task in enumerate(tasks):
            train_task(model, host.digits.format, method, task, config, seed=k, progress=False)
            row.append(exact_accuracy(model, host.digits.format, task.test))
        cells = " ".join(f"{a:>10.3f}" for a in row)
        print(
            f"{optimizer:<12} {lr:<7g} {epochs:>6} {batch:>5} | {cells} | {min(row):.3f} "
            f"{sum(row) / len(row):.3f} {time.perf_counter() - start:8.0f}",
            flush=True,
        )
        return row

    own = base.continual.train
    reference = None
    if args.match:
        reference = diagonal("adamw", own.lr, own.epochs, own.batch_size)
    diagonals = {
        (epochs, lr, batch): diagonal(args.optimizer, lr, epochs, batch)
        for lr, epochs, batch in itertools.product(args.lr, args.epochs, args.batch_size)
    }
    if reference is not None:
        target = sum(reference) / len(reference)
        epochs, lr, batch = min(
            diagonals, key=lambda s: abs(sum(diagonals[s]) / len(tasks) - target)
        )
        print(
            f"closest to AdamW's mean {target:.3f} with {args.optimizer}: "
            f"lr {lr:g} (epochs {epochs}, batch {batch})"
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
