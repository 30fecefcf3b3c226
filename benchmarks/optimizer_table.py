"""The optimizer table (docs/digits-study.md, "Does inter-modal forgetting depend on the
optimizer?") from finished runs, one per optimizer.

Per run and method, from the mean over its replicates: the accuracy right after training
each task (mean over tasks: what the learning rates were matched on), final accuracy and
forgetting, generation accuracy after the last task; and the conflict monitor's figures as
the report gives them: the mean cosine between the image-loss and text-loss gradients, the
image-loss change predicted by the optimizer's real update and measured (sums over the
monitored steps), their correlation, the paper's SGD formula -lr <grad L_image, grad L_text>
and its correlation with the measured change.

    .venv/bin/python benchmarks/optimizer_table.py runs/regime-today runs/optimizer-sgd \\
        runs/optimizer-sgd-momentum
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from modecl.core.report import conflict_figures
from modecl.core.results import Results, read_results

METHODS = "seq-lora,mode,mode-no-kd,lwf"
CONFLICT = ("cosine", "predicted", "measured", "correlation", "sgd", "sgd corr")


def label(results: Results) -> str:
    train = results.config["continual"]["train"]
    return f"{train.get('optimizer', 'adamw')}, lr {train['lr']:g}"


def rows(results: Results, methods: list[str]) -> list[str]:
    out = []
    for name in methods:
        entry = results.mean.methods.get(name)
        if entry is None:
            continue
        after = float(np.mean(np.diag(np.array(entry.accuracy_matrix))))
        figures = conflict_figures(entry) or {}
        cells = [
            after,
            entry.summary["final_average_accuracy"],
            entry.summary["average_forgetting"],
            entry.stages[-1].measures.get("generation_accuracy"),
            *(figures.get(k) for k in CONFLICT),
        ]
        text = " | ".join("–" if c is None else f"{c:.4f}" for c in cells)
        out.append(f"| {label(results)} | {name} | {text} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="out dirs, one per optimizer")
    parser.add_argument("--methods", default=METHODS)
    args = parser.parse_args()
    print(
        "| optimizer | method | acc. after each task | final acc | forgetting | generation "
        "| cos | predicted ΔL_image | measured ΔL_image | corr. | SGD formula | SGD formula corr. |"
    )
    print("|" + "---|" * 12)
    notes = []
    for run in args.runs:
        results = read_results(run / "results.json")
        print(*rows(results, args.methods.split(",")), sep="\n")
        hosts = len(results.hosts or [None])
        notes.append(f"{run}: {len(results.per_seed)} replicates over {hosts} host(s)")
    print("", *notes, sep="\n")


if __name__ == "__main__":
    main()
