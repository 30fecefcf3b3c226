"""The report: Markdown tables and figures, built from ``results.json`` and ``samples.npz``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def _fmt(mean: Any, std: Any = None, digits: int = 3) -> str:
    if mean is None:
        return "–"
    text = f"{mean:.{digits}f}"
    return f"{text} ± {std:.{digits}f}" if std is not None else text


def _get(entry: dict, key: str, final: bool = False) -> tuple[Any, Any]:
    """(mean, std) of a method entry's key, or of its final stage's key."""
    std = entry.get("std")
    if final:
        return entry["stages"][-1][key], std["stages"][-1][key] if std else None
    return entry[key], std[key] if std else None


def headline_rows(results: dict) -> list[str]:
    pre = results["pretrained"]
    columns = [
        ("final acc", "final_average_accuracy", False),
        ("forgetting", "average_forgetting", False),
        ("BWT", "bwt", False),
        ("gain kept", "gain_kept", False),
        ("constr. acc", "constrained_final_average_accuracy", False),
        ("constr. forg.", "constrained_average_forgetting", False),
        ("captioning", "captioning_accuracy", True),
        ("generation", "generation_accuracy", True),
        ("FD", "frechet_distance", True),
        ("image NLL", "image_nll", True),
    ]
    head = "| method | " + " | ".join(c[0] for c in columns) + " | gen. retention | time (s) |"
    rows = [head, "|" + "---|" * (len(columns) + 3)]
    pre_cells = ["–"] * 6 + [
        _fmt(pre["captioning_accuracy"]),
        _fmt(pre["generation_accuracy"]),
        _fmt(pre["frechet_distance"], digits=1),
        _fmt(pre["image_nll"]),
    ]
    rows.append("| pre-trained | " + " | ".join(pre_cells) + " | 1.000 | – |")
    for name, entry in results["methods"].items():
        cells = [
            _fmt(*_get(entry, key, final), digits=1 if key == "frechet_distance" else 3)
            for _, key, final in columns
        ]
        generation = entry["stages"][-1]["generation_accuracy"]
        retention = generation / pre["generation_accuracy"] if pre["generation_accuracy"] else None
        seconds = sum(s["wall_seconds"] for s in entry["stages"])
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(retention)} | {seconds:.0f} |")
    return rows


def matrix_rows(results: dict, name: str, key: str) -> list[str]:
    tasks = results["tasks"]
    pre_key = "task_accuracy" if key == "accuracy_matrix" else "constrained_task_accuracy"
    rows = ["| after | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    rows.append(
        "| pre-trained | " + " | ".join(_fmt(v) for v in results["pretrained"][pre_key]) + " |"
    )
    for task, row in zip(tasks, results["methods"][name][key], strict=True):
        rows.append(f"| {task} | " + " | ".join(_fmt(v) for v in row) + " |")
    return rows


def plot_matrices(results: dict, key: str, path: Path) -> None:
    names = list(results["methods"])
    cols = min(5, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    tasks = results["tasks"]
    for ax, name in zip(axes.flat, names, strict=False):
        matrix = np.array(results["methods"][name][key], dtype=float)
        ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v < 0.6 else "black",
            )
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(tasks)), [t[:5] for t in tasks], fontsize=7, rotation=45)
        ax.set_yticks(range(len(tasks)), [f"after {t[:5]}" for t in tasks], fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(f"{'constrained ' if 'constrained' in key else ''}accuracy matrix R[i][j]")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_generation(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    stages = ["pre-trained", *results["tasks"]]
    pre = results["pretrained"]["generation_accuracy"]
    for name, entry in results["methods"].items():
        ys = [pre] + [s["generation_accuracy"] for s in entry["stages"]]
        ax.plot(range(len(stages)), ys, marker="o", label=name)
    ax.set_xticks(range(len(stages)), stages, rotation=20)
    ax.set_ylabel("generation accuracy (judge)")
    ax.set_title("inter-modal forgetting: drawing after each understanding task")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(results: dict, samples: Any, name: str, path: Path) -> None:
    """Rows: stages; columns: digits 0-9 (several draws each)."""
    keys = ["pretrained"] + [f"{name}/stage{k + 1}" for k in range(len(results["tasks"]))]
    grids = [samples[k] for k in keys if k in samples]
    rows = [np.concatenate(list(np.concatenate(list(g), axis=1)), axis=1) for g in grids]
    picture = np.concatenate([np.pad(r, ((1, 1), (0, 0))) for r in rows], axis=0)
    fig, ax = plt.subplots(figsize=(max(6, picture.shape[1] / 12), 0.8 + len(rows) * 0.75))
    ax.imshow(picture, cmap="gray_r", vmin=0, vmax=16)
    ax.set_yticks(
        [10 * i + 5 for i in range(len(rows))],
        ["pre-trained", *results["tasks"]][: len(rows)],
        fontsize=8,
    )
    ax.set_xticks([])
    ax.set_title(f"{name}: 'draw a <digit>' for digits 0-9, after each task", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: str | Path) -> Path:
    """(Re)build ``report.md`` and ``figures/`` in ``out`` from its saved results."""
    out = Path(out)
    results = json.loads((out / "results.json").read_text())
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    plot_matrices(results, "accuracy_matrix", figures / "accuracy_matrices.png")
    plot_matrices(
        results, "constrained_accuracy_matrix", figures / "constrained_accuracy_matrices.png"
    )
    plot_generation(results, figures / "generation_accuracy.png")
    samples = np.load(out / "samples.npz") if (out / "samples.npz").exists() else {}
    for name in results["methods"]:
        plot_samples(results, samples, name, figures / f"samples_{name}.png")
    seeds = results["seed"] if isinstance(results["seed"], list) else [results["seed"]]
    judge = results["judge"]
    quick = " (QUICK run: a first look, not the benchmark)" if results["quick"] else ""
    lines = [
        f"# modecl digits benchmark{quick}",
        "",
        f"Tasks in order: {', '.join(results['tasks'])}. Seeds: {seeds}"
        f"{' (mean ± std over seeds)' if len(seeds) > 1 else ''}. "
        f"Judge accuracy on real test images {judge['real_accuracy']:.3f}, "
        f"on codebook reconstructions {judge['reconstructed_accuracy']:.3f}.",
        "",
        "Accuracies are exact match on each task's test set; 'constr.' restricts the answer to",
        "the task's answer set. Captioning, generation (share of drawn digits the judge",
        "recognises), FD (Frechet distance to real test images) and image NLL are measured",
        "after the last task; generation retention is final over pre-trained generation.",
        "",
        *headline_rows(results),
        "",
        "![generation accuracy](figures/generation_accuracy.png)",
        "",
        "![accuracy matrices](figures/accuracy_matrices.png)",
        "",
        "![constrained accuracy matrices](figures/constrained_accuracy_matrices.png)",
        "",
    ]
    for name in results["methods"]:
        lines += [f"## {name}", "", "Exact-match accuracy matrix:", ""]
        lines += matrix_rows(results, name, "accuracy_matrix")
        lines += ["", "Constrained accuracy matrix:", ""]
        lines += matrix_rows(results, name, "constrained_accuracy_matrix")
        lines += ["", f"![samples](figures/samples_{name}.png)", ""]
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "report.md")
    return out / "report.md"
