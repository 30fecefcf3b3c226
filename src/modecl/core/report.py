"""The report: Markdown tables and figures, built from ``results.json`` and ``samples.npz``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from modecl.core.files import write_atomic


def _save(fig: plt.Figure, path: Path) -> None:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    _save(fig, path)


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
    _save(fig, path)


def plot_samples(results: dict, samples: Any, name: str, path: Path) -> None:
    """Rows: stages; columns: digits 0-9 (several draws each)."""
    keys = ["pretrained"] + [f"{name}/stage{k + 1}" for k in range(len(results["tasks"]))]
    grids = [samples[k] for k in keys if k in samples]
    # [digits, draws, 8, 8] -> one 8-pixel-high strip: digit 0's draws, then digit 1's ...
    rows = [g.transpose(2, 0, 1, 3).reshape(g.shape[2], -1) for g in grids]
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
    _save(fig, path)


GROUPS = ("shared", "text", "image", "router")


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _curve(values: list) -> list[float]:
    """Undefined points (None) as gaps in a line plot."""
    return [float("nan") if v is None else v for v in values]


def conflict_rows(results: dict) -> list[str]:
    """Per method: mean cosine(grad L_image, grad L_text) by group, and the image-loss change."""
    head = "| method | cos all | " + " | ".join(f"cos {g}" for g in GROUPS)
    head += " | predicted ΔL_image | measured ΔL_image | corr. (mean over tasks) | SGD formula |"
    rows = [head, "|" + "---|" * (len(GROUPS) + 6)]
    for name, entry in results["methods"].items():
        stages = [s["conflict"] for s in entry["stages"] if s.get("conflict", {}).get("steps")]
        if not stages:
            continue
        cosines = [
            _mean([s["by_group"].get(g, {}).get("mean_cosine") for s in stages]) for g in GROUPS
        ]
        cells = [
            _mean([s["mean_cosine"] for s in stages]),
            *cosines,
            sum(s["predicted_image_loss_change"] for s in stages),
            sum(s["measured_image_loss_change"] for s in stages),
            _mean([s["correlation"] for s in stages]),
            sum(s["sgd_image_loss_change"] for s in stages),
        ]
        rows.append(f"| {name} | " + " | ".join(_fmt(c, digits=4) for c in cells) + " |")
    return rows


CONFLICT_COLUMNS = 3  # methods per row: about 1,200 px wide at the saved dpi


def plot_conflict(series: list[dict], path: Path) -> None:
    """Per method, two stacked panels over the monitored steps: cumulative predicted vs
    measured ΔL_image, and cosines; methods fill a grid of ``CONFLICT_COLUMNS`` per row."""
    seed = series[0]["seed"]
    names = list(dict.fromkeys(s["method"] for s in series))
    cols = min(CONFLICT_COLUMNS, len(names))
    rows = -(-len(names) // cols)
    fig = plt.figure(figsize=(3.6 * cols, 4.4 * rows), layout="constrained")
    panels = fig.subfigures(rows, cols, squeeze=False, hspace=0.04, wspace=0.02)
    for cell, (name, panel) in enumerate(zip(names, panels.flat, strict=False)):
        steps = [s for s in series if s["method"] == name and s["seed"] == seed]
        x = np.arange(len(steps))
        top, bottom = panel.subplots(2, 1, sharex=True)
        for key, label, style in (
            ("predicted", "predicted <g_I, Δθ>", "-"),
            ("measured", "measured", "-"),
            ("sgd", "SGD formula -lr <g_I, g_T>", "--"),
        ):
            ys = np.cumsum([s[f"{key}_image_loss_change"] for s in steps])
            top.plot(x, ys, style, label=label)
        bottom.plot(x, _curve([s["cosine"] for s in steps]), "k", label="all")
        for g in GROUPS:
            if g in steps[0]["by_group"]:
                ys = _curve([s["by_group"][g]["cosine"] for s in steps])
                bottom.plot(x, ys, lw=0.8, label=g)
        bottom.axhline(0, color="grey", lw=0.5)
        for i in range(1, len(steps)):  # task boundaries
            if steps[i]["stage"] != steps[i - 1]["stage"]:
                top.axvline(i - 0.5, color="grey", ls=":", lw=0.8)
                bottom.axvline(i - 0.5, color="grey", ls=":", lw=0.8)
        top.set_title(name, fontsize=9)
        bottom.set_xlabel("monitored step (all tasks)", fontsize=8)
        if cell % cols == 0:
            top.set_ylabel("cumulative ΔL_image", fontsize=8)
            bottom.set_ylabel("cos(g_image, g_text)", fontsize=8)
        top.legend(fontsize=6)
        bottom.legend(fontsize=6)
    fig.suptitle(f"gradient conflict through the sequence (seed {seed})", fontsize=10)
    _save(fig, path)


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
    series_file = out / "conflict.jsonl"
    text = series_file.read_text() if series_file.exists() else ""
    series = [json.loads(line) for line in text.splitlines()]
    if series:
        plot_conflict(series, figures / "conflict.png")
        lines += [
            "## Gradient conflict",
            "",
            "On every monitored step: the cosine between the gradient of the image loss",
            "(teacher-forced NLL of held-out 'draw a <digit>' images) and that of the task's",
            "cross-entropy, by parameter group, and the image loss's change across the step,",
            "predicted to first order (<grad L_image, Δθ>, Δθ the optimizer's real update) and",
            "measured. Cosines are means over monitored steps and tasks; changes are sums over",
            "the monitored steps only (one step in `continual.monitor.every`). 'SGD formula' is",
            "the paper's -lr <grad L_image, grad L_text>: what the change would be if the step",
            "were plain SGD on the task loss alone.",
            "",
            *conflict_rows(results),
            "",
            "![gradient conflict](figures/conflict.png)",
            "",
        ]
    for name in results["methods"]:
        lines += [f"## {name}", "", "Exact-match accuracy matrix:", ""]
        lines += matrix_rows(results, name, "accuracy_matrix")
        lines += ["", "Constrained accuracy matrix:", ""]
        lines += matrix_rows(results, name, "constrained_accuracy_matrix")
        lines += ["", f"![samples](figures/samples_{name}.png)", ""]
    write_atomic(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


def _alignment(generation: dict | None) -> tuple[str, str, str]:
    """(image alignment, text alignment, note) cells of a stage's generation entry."""
    if generation is None:
        return "–", "–", "no test pairs"
    clip = generation["clip"]
    if clip["status"] != "ok":
        return "–", "–", clip["reason"]
    return _fmt(clip["image_alignment"]), _fmt(clip["text_alignment"]), ""


def plot_losses(stages: list[dict], path: Path) -> None:
    """Task CE (and KD, when distilling) per step, the tasks one after another."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    start = 0
    for stage in stages:
        steps = np.arange(start, start + len(stage["losses"]))
        ax.plot(steps, stage["losses"], label=f"CE {stage['task']}")
        if stage["kd_losses"]:
            ax.plot(steps, stage["kd_losses"], linestyle=":", color="gray")
        ax.axvline(start, color="lightgray", linewidth=0.8)
        start += len(stage["losses"])
    ax.set_xlabel("training step (dotted: distillation KL)")
    ax.set_ylabel("loss")
    ax.set_yscale("symlog", linthresh=1e-6)  # the KL starts at exactly 0
    highest = max((max(s["losses"]) for s in stages if s["losses"]), default=1.0)
    ax.set_ylim(0, 2 * highest)
    ax.legend(fontsize=7)
    _save(fig, path)


def write_train_report(out: str | Path) -> Path:
    """(Re)build ``report.md`` and ``figures/`` of a `modecl train` run from its results."""
    out = Path(out)
    results = json.loads((out / "results.json").read_text())
    tasks, method = results["task_names"], results["method"]
    # The benchmark's table and figure helpers read this shape.
    view = {
        "tasks": tasks,
        "pretrained": results["pretrained"],
        "methods": {method: {"accuracy_matrix": results["accuracy_matrix"]}},
    }
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    plot_matrices(view, "accuracy_matrix", figures / "accuracy_matrix.png")
    plot_losses(results["stages"], figures / "losses.png")
    rules = ", ".join(f"{t} ({results['scoring'][t]})" for t in tasks)
    lines = [
        f"# modecl train: {method} on {results['model']}",
        "",
        f"Tasks in order, with their scoring rules: {rules}.",
        "",
        "| final acc | forgetting | BWT | gain kept |",
        "|---|---|---|---|",
        "| "
        + " | ".join(
            _fmt(results[k])
            for k in ("final_average_accuracy", "average_forgetting", "bwt", "gain_kept")
        )
        + " |",
        "",
        "Accuracy matrix (row: after training that task; column: the task measured):",
        "",
        *matrix_rows(view, method, "accuracy_matrix"),
        "",
        "![accuracy matrix](figures/accuracy_matrix.png)",
        "",
        "![training losses](figures/losses.png)",
        "",
        "Image generation (inter-modal forgetting): teacher-forced image-token NLL of the test",
        "pairs, and CLIP alignment of images drawn from their captions.",
        "",
        "| after | image NLL | CLIP image | CLIP text | note |",
        "|---|---|---|---|---|",
    ]
    for name, stage in [("pre-trained", results["pretrained"])] + [
        (s["task"], s) for s in results["stages"]
    ]:
        image, text, note = _alignment(stage.get("generation"))
        lines.append(f"| {name} | {_fmt(stage.get('image_nll'))} | {image} | {text} | {note} |")
    write_atomic(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"
