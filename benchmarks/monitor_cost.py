"""What the gradient-conflict monitor costs, and what it shows, on the cached digits host.

Trains seq-lora and mode on the first task of the default sequence from the pre-trained
host (RunConfig defaults; fewer samples and epochs to keep it short), three ways: monitor
off, on every `--every` steps (the default), and on every step. Variants are timed
round-robin so that load from other processes spreads evenly; each reports the median
training time. Then prints each method's conflict summary from its every-step run.

    .venv/bin/python benchmarks/monitor_cost.py [--samples N] [--epochs N] [--repeats N]

The last line is `monitor_cost_ratio=<ratio>`: time with the default monitor over time
without it, the worse of the two methods.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from modecl.core.adapters import attach_adapters
from modecl.core.conflict import ConflictMonitor, summarize_conflict
from modecl.core.methods import get_method
from modecl.core.train import train_task
from modecl.digits.config import RunConfig
from modecl.digits.pretrain import load_or_pretrain

METHODS = ("seq-lora", "mode")


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=320, help="training samples of the task")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
    parser.add_argument("--every", type=int, default=RunConfig().continual.monitor.every)
    # One thread: on a shared machine, OpenMP threads stall whenever another process
    # holds one of their cores, which swamps the differences measured here.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = RunConfig()
    settings = config.continual
    settings.train.max_train_samples, settings.train.epochs = args.samples, args.epochs
    host = load_or_pretrain(config.host, progress=False)
    digits = host.digits
    task = digits.tasks(config.tasks[:1])[0]
    draw_pairs = digits.draw_pairs(digits.pools.train)
    probe = digits.draw_pairs(digits.pools.test[: settings.monitor.probe_size])
    variants = {"off": None, f"every {args.every}": args.every, "every 1": 1}

    def train(name: str, every: int | None) -> dict:
        method = get_method(name)
        model = copy.deepcopy(host.model)
        torch.manual_seed(0)
        attach_adapters(model, method.adapter_config(settings))
        method.configure(settings, draw_pairs)
        monitor = None if every is None else ConflictMonitor(digits.format, probe, every)
        return train_task(
            model,
            digits.format,
            method,
            task,
            settings,
            progress=False,
            monitor=monitor,
        )

    seconds = {(m, v): [] for m in METHODS for v in variants}
    logs = {}
    for _ in range(args.repeats + 1):  # the first round warms up
        for (name, variant), times in seconds.items():
            logs[name, variant] = train(name, variants[variant])
            times.append(logs[name, variant]["seconds"])

    steps = len(logs[METHODS[0], "off"]["loss"])
    print(
        f"task {task.name}: {steps} steps (batch {settings.train.batch_size}), probe "
        f"{len(probe)} pairs, {torch.get_num_threads()} thread(s), median of {args.repeats} runs"
    )
    print(f"{'method':<10}" + "".join(f"{v + ' s':>14}" for v in variants) + "   ratios to off")
    ratios = []
    for name in METHODS:
        med = {v: statistics.median(seconds[name, v][1:]) for v in variants}
        cells = "".join(f"{t:>14.2f}" for t in med.values())
        rel = [med[v] / med["off"] for v in list(variants)[1:]]
        ratios.append(rel[0])
        print(f"{name:<10}{cells}   " + "  ".join(f"{r:.3f}" for r in rel))

    print("\nconflict on every step (sums over the task; cosines are means over steps):")
    for name in METHODS:
        summary = summarize_conflict(logs[name, "every 1"]["conflict"])
        groups = ", ".join(
            f"{g} {s['mean_cosine']:+.3f}"
            for g, s in summary["by_group"].items()
            if s["mean_cosine"] is not None
        )
        print(
            f"{name:<10} cos {summary['mean_cosine']:+.3f} ({groups}); predicted "
            f"{summary['predicted_image_loss_change']:+.4f}, measured "
            f"{summary['measured_image_loss_change']:+.4f} (SGD formula "
            f"{summary['sgd_image_loss_change']:+.4f}), corr {_fmt(summary['correlation'])}"
        )
    print(f"monitor_cost_ratio={max(ratios):.3f}")


if __name__ == "__main__":
    main()
