"""The regime table (docs/digits-study.md, "Where does the T-MoE help?") from finished runs.

For each run (one schedule) and method: final accuracy and forgetting, exact and
constrained, the host's generation accuracy after the last task, and the router's use
after the last task (the mean over tasks of the normalized entropy of each token's router
weights, and how far the tasks' mean expert shares lie apart: the mean total-variation
distance of each task's shares from their average over tasks, 0 = every task uses the
experts alike); mean ± std over seeds. Then, per seed, each method's forgetting minus
seq-lora's (negative: forgets less), the test of whether the seeds agree.

    .venv/bin/python benchmarks/regime_table.py runs/regime-today runs/regime-gentle
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from modecl.core.metrics import mean_std
from modecl.core.results import Results, Stage, read_results

METHODS = "seq-lora,moe-lora,moe-lora-split,mode,mode-split,mode-text-lora"
SUMMARY = (
    "final_average_accuracy",
    "average_forgetting",
    "constrained_final_average_accuracy",
    "constrained_average_forgetting",
)


def cell(values: list[float | None]) -> str:
    """mean ± sample std over seeds (as the report; std only with more than one seed);
    – when missing."""
    if not values or any(v is None for v in values):
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.3f} ± {std:.3f}" if len(values) > 1 else f"{mean:.3f}"


def router_use(stage: Stage, tasks: list[str]) -> tuple[float | None, float | None]:
    """(mean token entropy over tasks, mean TV distance of the tasks' shares from their
    average) after ``stage``; (None, None) without a router."""
    if not stage.routing:
        return None, None
    shares = np.array([stage.routing[t]["shares"] for t in tasks])
    spread = 0.5 * np.abs(shares - shares.mean(0)).sum(1).mean()
    return float(np.mean([stage.routing[t]["entropy"] for t in tasks])), float(spread)


def schedule(results: Results) -> str:
    train = results.config["continual"]["train"]
    return f"{train['epochs']} ep, lr {train['lr']:g}"


def rows(results: Results, methods: list[str]) -> tuple[list[str], list[str]]:
    table, paired = [], []
    runs = {m: [s.methods[m] for s in results.per_seed] for m in methods}
    base = [r.summary["average_forgetting"] for r in runs.get("seq-lora", [])]
    for name, per_seed in runs.items():
        summary = [cell([r.summary[k] for r in per_seed]) for k in SUMMARY]
        last = [r.stages[-1] for r in per_seed]
        generation = cell([s.measures.get("generation_accuracy") for s in last])
        use = [router_use(s, results.tasks) for s in last]
        router = [cell([u[0] for u in use]), cell([u[1] for u in use])]
        table.append(
            f"| {schedule(results)} | {name} | "
            + " | ".join([*summary, generation, *router])
            + " |"
        )
        if base and name != "seq-lora":
            gaps = [
                r.summary["average_forgetting"] - b for r, b in zip(per_seed, base, strict=True)
            ]
            paired.append(
                f"{schedule(results)}: {name} - seq-lora forgetting per seed: "
                + ", ".join(f"{g:+.3f}" for g in gaps)
                + f" (lower in {sum(g < 0 for g in gaps)} of {len(gaps)})"
            )
    return table, paired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="out dirs, one per schedule")
    parser.add_argument("--methods", default=METHODS, help=f"default: {METHODS}")
    args = parser.parse_args()
    methods = args.methods.split(",")
    head = [
        "schedule",
        "method",
        "final acc",
        "forgetting",
        "constr. acc",
        "constr. forg.",
        "generation",
        "router entropy",
        "task spread",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    notes = []
    for run in args.runs:
        results = read_results(run / "results.json")
        missing = [m for m in methods if m not in results.mean.methods]
        if missing:
            parser.error(f"{run}: no results for {missing}")
        table, paired = rows(results, methods)
        print("\n".join(table))
        notes += paired
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
