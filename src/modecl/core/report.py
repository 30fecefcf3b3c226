"""The report: Markdown tables and figures, built from ``results.json`` (and ``samples.npz``,
``conflict.jsonl``) of either front door. Sections appear when the run has their data:
drawn-image grids, image generation (CLIP, KID, FD), gradient conflict, constrained accuracy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from modecl.core.claims import claim_rows, tally
from modecl.core.files import atomic_path, write_atomic
from modecl.core.metrics import variance_split
from modecl.core.results import MethodResult, Results, SeedResult, Stage, read_results

# World measures shown as headline columns when a run has them: (label, key, digits).
MEASURES = (
    ("captioning", "captioning_accuracy", 3),
    ("generation", "generation_accuracy", 3),
    ("FD", "frechet_distance", 1),
    ("image NLL", "image_nll", 3),
    ("concepts CLIP-I", "concepts_clip_image_all", 3),
    ("concepts CLIP-T", "concepts_clip_text", 3),
    ("concepts KID", "concepts_kid", 4),
    ("pairs CLIP-I own", "pairs_clip_image_own", 3),
    ("pairs CLIP-T", "pairs_clip_text", 3),
)
# The measure the generation figure plots: the first of these that the run has.
CURVES = ("generation_accuracy", "concepts_clip_image_all", "pairs_clip_image_own", "image_nll")
SUMMARY = (
    ("final acc", "final_average_accuracy"),
    ("forgetting", "average_forgetting"),
    ("BWT", "bwt"),
    ("gain kept", "gain_kept"),
    ("constr. acc", "constrained_final_average_accuracy"),
    ("constr. forg.", "constrained_average_forgetting"),
)


def _save(fig: plt.Figure, path: Path) -> None:
    """Write a figure atomically (a full disk leaves the previous one, or none) and close it."""
    try:
        if fig.get_layout_engine() is None:
            fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip("."))
    finally:
        plt.close(fig)


def _fmt(mean: Any, std: Any = None, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "–"
    text = f"{mean:.{digits}f}"
    return f"{text} ± {std:.{digits}f}" if std is not None else text


def _measures_present(results: Results) -> list[tuple[str, str, int]]:
    """The world measures of this run that hold a number (pre-trained or after a stage)."""
    stages = [results.mean.pretrained] + [
        s for m in results.mean.methods.values() for s in m.stages
    ]
    return [c for c in MEASURES if any(s.measures.get(c[1]) is not None for s in stages)]


def headline_rows(results: Results) -> list[str]:
    """The headline table: one row per method (mean ± std over seeds), the host first."""
    mean, std = results.mean, results.std
    measures = _measures_present(results)
    head = [c[0] for c in SUMMARY] + [c[0] for c in measures]
    generation = any(c[1] == "generation_accuracy" for c in measures)
    head += ["gen. retention"] * generation + ["time (s)"]
    rows = ["| method | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
    pre = mean.pretrained.measures
    cells = ["–"] * len(SUMMARY) + [_fmt(pre.get(k), digits=d) for _, k, d in measures]
    cells += ["1.000"] * generation + ["–"]
    rows.append("| pre-trained | " + " | ".join(cells) + " |")
    for name, entry in mean.methods.items():
        spread = std["methods"][name] if std else None
        cells = [
            _fmt(entry.summary[k], spread["summary"][k] if spread else None) for _, k in SUMMARY
        ]
        last = entry.stages[-1].measures
        last_std = spread["stages"][-1]["measures"] if spread else {}
        cells += [_fmt(last.get(k), last_std.get(k), digits=d) for _, k, d in measures]
        if generation:
            base = pre.get("generation_accuracy")
            cells.append(_fmt(last["generation_accuracy"] / base if base else None))
        cells.append(f"{sum(s.wall_seconds for s in entry.stages):.0f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def _has_constrained(results: Results) -> bool:
    stages = [results.mean.pretrained] + [
        s for m in results.mean.methods.values() for s in m.stages
    ]
    return any(v is not None for s in stages for v in s.constrained_task_accuracy)


def matrix_rows(results: Results, name: str, constrained: bool = False) -> list[str]:
    tasks, mean = results.tasks, results.mean
    pre = mean.pretrained
    entry = mean.methods[name]
    rows = ["| after | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    first = pre.constrained_task_accuracy if constrained else pre.task_accuracy
    rows.append("| pre-trained | " + " | ".join(_fmt(v) for v in first) + " |")
    matrix = entry.constrained_accuracy_matrix if constrained else entry.accuracy_matrix
    for task, row in zip(tasks, matrix, strict=True):
        rows.append(f"| {task} | " + " | ".join(_fmt(v) for v in row) + " |")
    return rows


def plot_matrices(results: Results, path: Path, constrained: bool = False) -> None:
    names = list(results.mean.methods)
    cols = min(5, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    tasks = results.tasks
    for ax, name in zip(axes.flat, names, strict=False):
        entry = results.mean.methods[name]
        matrix = entry.constrained_accuracy_matrix if constrained else entry.accuracy_matrix
        matrix = np.array([[np.nan if v is None else v for v in row] for row in matrix])
        ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for (i, j), v in np.ndenumerate(matrix):
            text = "–" if np.isnan(v) else f"{v:.2f}"
            color = "white" if np.isnan(v) or v < 0.6 else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(tasks)), [t[:5] for t in tasks], fontsize=7, rotation=45)
        ax.set_yticks(range(len(tasks)), [f"after {t[:5]}" for t in tasks], fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(f"{'constrained ' if constrained else ''}accuracy matrix R[i][j]")
    _save(fig, path)


def plot_generation(results: Results, key: str, label: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    stages = ["pre-trained", *results.tasks]
    pre = results.mean.pretrained.measures.get(key)
    colors = plt.get_cmap("tab10").colors
    for i, (name, entry) in enumerate(results.mean.methods.items()):
        ys = [pre] + [s.measures.get(key) for s in entry.stages]
        ax.plot(  # past ten methods the colors repeat: a dashed, then dotted line tells them apart
            range(len(stages)),
            [np.nan if y is None else y for y in ys],
            marker="os^"[i // 10 % 3],
            linestyle=("-", "--", ":")[i // 10 % 3],
            color=colors[i % 10],
            label=name,
        )
    ax.set_xticks(range(len(stages)), stages, rotation=20)
    ax.set_ylabel(label)
    ax.set_title("inter-modal forgetting: drawing after each understanding task")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    _save(fig, path)


def routed_methods(results: Results) -> list[str]:
    """The methods whose stages recorded their router's use."""
    return [n for n, e in results.mean.methods.items() if e.stages and e.stages[-1].routing]


def plot_routing(results: Results, path: Path) -> None:
    """Expert use per task: per routed method, the mean expert share on each task's test
    tokens after the last stage (experts x tasks), and the router's normalized entropy on
    each task after every stage (one line per task: 1 = uniform, 0 = one expert)."""
    names = routed_methods(results)
    width = max(4.5, 3.4 * len(names))
    fig, axes = plt.subplots(2, len(names), figsize=(width, 5.6), squeeze=False)
    tasks = results.tasks
    for col, name in enumerate(names):
        stages = results.mean.methods[name].stages
        shares = np.array([stages[-1].routing[t]["shares"] for t in tasks]).T
        ax = axes[0, col]
        ax.imshow(shares, vmin=0, vmax=1, cmap="magma", aspect="auto")
        for (i, j), v in np.ndenumerate(shares):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="tab:cyan")
        ax.set_title(f"{name}: share after the last task", fontsize=8)
        ax.set_xticks(range(len(tasks)), [t[:5] for t in tasks], fontsize=7, rotation=45)
        ax.set_yticks(range(len(shares)), [f"expert {e}" for e in range(len(shares))], fontsize=7)
        ax = axes[1, col]
        for task in tasks:
            ax.plot([s.routing[task]["entropy"] for s in stages], marker="o", label=task[:5])
        ax.set_ylim(0, 1.05)
        ax.set_xticks(
            range(len(stages)), [f"after {t[:5]}" for t in tasks], fontsize=7, rotation=45
        )
        ax.set_title(f"{name}: router entropy / log N", fontsize=8)
        ax.grid(alpha=0.3)
    axes[1, 0].legend(fontsize=7)
    fig.suptitle("expert use per task (its routed test tokens)", fontsize=10)
    _save(fig, path)


def plot_samples(results: Results, samples: Any, name: str, path: Path) -> None:
    """Rows: stages; columns: the drawn images (gray digits 0..16, or RGB bytes)."""
    keys = ["pretrained"] + [f"{name}/stage{k + 1}" for k in range(len(results.tasks))]
    labels = ["pre-trained", *results.tasks]
    present = [(k, label) for k, label in zip(keys, labels, strict=True) if k in samples]
    grids = [samples[k] for k, _ in present]
    rgb = grids[0].ndim == 5
    # [groups, draws, H, W(, 3)] -> one strip per stage: group 0's draws, then group 1's ...
    strips = [np.concatenate(list(g.reshape(-1, *g.shape[2:])), axis=1) for g in grids]
    height = strips[0].shape[0]
    pad = ((1, 1), (0, 0), (0, 0)) if rgb else ((1, 1), (0, 0))
    picture = np.concatenate([np.pad(s, pad) for s in strips], axis=0)
    fig, ax = plt.subplots(figsize=(max(6, picture.shape[1] / 12), 0.8 + len(strips) * 0.75))
    if rgb:
        ax.imshow(picture.astype(np.uint8))
    else:
        ax.imshow(picture, cmap="gray_r", vmin=0, vmax=16)
    ax.set_yticks(
        [(height + 2) * i + height / 2 for i in range(len(strips))],
        [label for _, label in present],
        fontsize=8,
    )
    ax.set_xticks([])
    ax.set_title(f"{name}: images drawn after each task", fontsize=9)
    _save(fig, path)


def plot_losses(results: Results, path: Path) -> None:
    """Per method (first seed): the task CE and each loss term per step, tasks in turn."""
    names = list(results.per_seed[0].methods)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        stages = results.per_seed[0].methods[name].stages
        start, highest = 0, 1e-6
        for stage in stages:
            steps = np.arange(start, start + len(stage.losses.get("ce", [])))
            for term, values in stage.losses.items():
                style = {"linestyle": "-"} if term == "ce" else {"linestyle": ":", "color": "gray"}
                ax.plot(steps, values, lw=0.8, **style)
                highest = max(highest, max(values, default=0.0))
            ax.axvline(start, color="lightgray", linewidth=0.8)
            start += len(steps)
        ax.set_yscale("symlog", linthresh=1e-6)  # a distillation KL starts at exactly 0
        ax.set_ylim(0, 2 * highest)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step (solid: task CE; dotted: loss terms)", fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    _save(fig, path)


GROUPS = ("shared", "text", "image", "router")


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _curve(values: list) -> list[float]:
    """Undefined points (None) as gaps in a line plot."""
    return [float("nan") if v is None else v for v in values]


def conflict_rows(results: Results) -> list[str]:
    """Per method: mean cosine(grad L_image, grad L_text) by group, and the image-loss change."""
    head = "| method | cos all | " + " | ".join(f"cos {g}" for g in GROUPS)
    head += " | predicted ΔL_image | measured ΔL_image | corr. (mean over tasks) | SGD formula"
    head += " | SGD formula corr. |"
    rows = [head, "|" + "---|" * (len(GROUPS) + 7)]
    for name, entry in results.mean.methods.items():
        figures = conflict_figures(entry)
        if figures is None:
            continue
        cells = [figures["cosine"], *(figures[f"cosine {g}"] for g in GROUPS)]
        cells += [figures[k] for k in ("predicted", "measured", "correlation", "sgd", "sgd corr")]
        rows.append(f"| {name} | " + " | ".join(_fmt(c, digits=4) for c in cells) + " |")
    return rows


def conflict_figures(entry: MethodResult) -> dict[str, float | None] | None:
    """A method's conflict monitor figures over its tasks (None: not monitored): the mean
    cosine between the image-loss and text-loss gradients, overall and per group; the
    predicted (real update) and measured image-loss changes and the SGD formula's, summed
    over the monitored steps; their correlations, means over tasks."""
    stages = [s.conflict for s in entry.stages if s.conflict and s.conflict.get("steps")]
    if not stages:
        return None
    groups = {
        f"cosine {g}": _mean([s["by_group"].get(g, {}).get("mean_cosine") for s in stages])
        for g in GROUPS
    }
    return {
        "cosine": _mean([s["mean_cosine"] for s in stages]),
        **groups,
        "predicted": sum(s["predicted_image_loss_change"] for s in stages),
        "measured": sum(s["measured_image_loss_change"] for s in stages),
        "correlation": _mean([s["correlation"] for s in stages]),
        "sgd": sum(s["sgd_image_loss_change"] for s in stages),
        "sgd corr": _mean([s.get("sgd_correlation") for s in stages]),
    }


CONFLICT_COLUMNS = 3  # methods per row: about 1,200 px wide at the saved dpi


def plot_conflict(series: list[dict], path: Path) -> None:
    """Per method, two stacked panels over the monitored steps: cumulative predicted vs
    measured ΔL_image, and cosines; methods fill a grid of ``CONFLICT_COLUMNS`` per row."""
    first = (series[0].get("host"), series[0]["seed"])
    names = list(dict.fromkeys(s["method"] for s in series))
    cols = min(CONFLICT_COLUMNS, len(names))
    rows = -(-len(names) // cols)
    fig = plt.figure(figsize=(3.6 * cols, 4.4 * rows), layout="constrained")
    panels = fig.subfigures(rows, cols, squeeze=False, hspace=0.04, wspace=0.02)
    for cell, (name, panel) in enumerate(zip(names, panels.flat, strict=False)):
        steps = [s for s in series if s["method"] == name and (s.get("host"), s["seed"]) == first]
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
    where = f"seed {first[1]}" if first[0] is None else f"host {first[0]}, seed {first[1]}"
    fig.suptitle(f"gradient conflict through the sequence ({where})", fontsize=10)
    _save(fig, path)


SITES = (("by_layer", "decoder layer"), ("by_module", "module"), ("by_group", "branch"))


def site_changes(results: Results) -> dict[str, dict[str, dict[str, float]]]:
    """Per method with split monitor figures: the predicted ΔL_image summed over its
    monitored steps and tasks (mean over replicates), by layer, by module and by branch."""
    out = {}
    for name, entry in results.mean.methods.items():
        stages = [s.conflict for s in entry.stages if s.conflict and s.conflict.get("by_layer")]
        if not stages:
            continue
        out[name] = {
            split: {
                site: sum(c[split][site]["predicted_image_loss_change"] for c in stages)
                for site in stages[0][split]
            }
            for split, _ in SITES
        }
    return out


def plot_conflict_sites(changes: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    """Per method (rows): which parameters carry the image loss's predicted change, summed
    over the sequence, split by decoder layer, by module and by branch (columns)."""
    fig, axes = plt.subplots(
        len(changes),
        len(SITES),
        figsize=(3.4 * len(SITES), 1.9 * len(changes) + 0.6),
        squeeze=False,
        sharey="row",
    )
    for row, (name, splits) in enumerate(changes.items()):
        for col, (split, label) in enumerate(SITES):
            ax, parts = axes[row, col], splits[split]
            values = list(parts.values())
            ax.bar(
                range(len(parts)),
                values,
                color=["tab:red" if v > 0 else "tab:blue" for v in values],
            )
            ax.set_xticks(range(len(parts)), list(parts), fontsize=7)
            ax.axhline(0, color="grey", lw=0.5)
            if row == 0:
                ax.set_title(f"by {label}", fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{name}\nΣ predicted ΔL_image", fontsize=8)
    fig.suptitle("where the image loss's change sits (red: rise)", fontsize=10)
    _save(fig, path)


def _first_seed_stages(results: Results) -> list[tuple[str, Stage]]:
    """(method, stage) of the first seed: the pre-trained host, then each method's stages."""
    seed: SeedResult = results.per_seed[0]
    entries: list[tuple[str, Stage]] = [("pre-trained", seed.pretrained)]
    for name, entry in seed.methods.items():
        entries += [(name, s) for s in entry.stages]
    return entries


def drawing_rows(results: Results, kind: str) -> list[str]:
    """Per method and stage (first seed): the scores of `kind`'s drawings ("pairs" or
    "concepts"), KID before FD, or why there are none."""
    nll = ["image NLL"] if kind == "pairs" else []
    head = ["method", "after", *nll, "drawn", "CLIP-I all", "CLIP-I own", "CLIP-T", "KID", "FD"]
    rows = ["| " + " | ".join([*head, "note"]) + " |", "|" + "---|" * (len(head) + 1)]
    for name, stage in _first_seed_stages(results):
        entry = stage.measures.get(f"{kind}_generation")
        if entry is None:
            continue
        clip = entry["clip"]
        cells = [_fmt(stage.measures.get("image_nll"))] * len(nll) + [str(entry["drawn"])]
        cells += [_fmt(clip.get(k)) for k in ("image_alignment_all", "image_alignment_own")]
        cells += [_fmt(clip.get("text_alignment")), _fmt(clip.get("kid"), clip.get("kid_std"), 4)]
        cells += [_fmt(clip.get("fd"), digits=2), clip.get("note") or clip.get("reason", "")]
        rows.append(f"| {name} | {stage.task} | " + " | ".join(cells) + " |")
    return rows


def concept_rows(results: Results) -> list[str]:
    """Per concept: CLIP-I own of the pre-trained host and after each method's last task
    (first seed); no rows without per-concept scores."""
    seed = results.per_seed[0]
    columns = [("pre-trained", seed.pretrained)]
    columns += [(name, entry.stages[-1]) for name, entry in seed.methods.items()]
    scores = [
        ((s.measures.get("concepts_generation") or {}).get("clip") or {}).get("per_concept") or {}
        for _, s in columns
    ]
    names = list(dict.fromkeys(n for per in scores for n in per))
    if not names:
        return []
    rows = ["| concept | " + " | ".join(c for c, _ in columns) + " |"]
    rows.append("|" + "---|" * (len(columns) + 1))
    rows += [f"| {n} | " + " | ".join(_fmt(per.get(n)) for per in scores) + " |" for n in names]
    return rows


def generation_lines(results: Results) -> list[str]:
    """The report's image-generation section; none when the run drew no images."""
    measures = results.per_seed[0].pretrained.measures
    kinds = [k for k in ("concepts", "pairs") if f"{k}_generation" in measures]
    if not kinds:
        return []
    lines = [
        "## Image generation",
        "",
        "Images drawn after every task (first seed) and scored by CLIP (`eval.clip_model`):",
        "CLIP-I all is the mean cosine of each drawing with every reference image (the paper's",
        "rule), CLIP-I own with its own concept's images (a test pair: its own image), CLIP-T",
        "with its prompt. KID (mean ± std over random subsets) and FD compare the drawings'",
        "CLIP image embeddings with the references'. FD needs more drawings and references than",
        "CLIP has feature dimensions (512 for ViT-B/32): below that its covariances are",
        "singular and it mostly measures the sample size (the note says so); read KID first.",
        "",
    ]
    if "concepts" in kinds:
        lines += [
            "### Concepts: each concept prompt's drawings against every concept's images",
            "",
            *drawing_rows(results, "concepts"),
            "",
        ]
        per_concept = concept_rows(results)
        if per_concept:
            lines += ["CLIP-I own per concept, pre-trained and after the last task:", ""]
            lines += [*per_concept, ""]
    if "pairs" in kinds:
        lines += [
            "### Test pairs: drawings of the test captions against the test pairs' images",
            "",
            "With the teacher-forced image-token NLL of the test pairs.",
            "",
            *drawing_rows(results, "pairs"),
            "",
        ]
    return lines


# (label, summary key or None, world measure after the last task or None) for the split
SPREAD = (
    ("final acc", "final_average_accuracy", None),
    ("forgetting", "average_forgetting", None),
    ("constr. forg.", "constrained_average_forgetting", None),
    ("generation", None, "generation_accuracy"),
)


def host_groups(results: Results) -> dict[int, list[SeedResult]]:
    """The replicates of a run over several hosts, by host label (the host's seed)."""
    groups: dict[int, list[SeedResult]] = {}
    for rep in results.per_seed:
        groups.setdefault((rep.host or {}).get("seed"), []).append(rep)
    return groups


def spread_rows(results: Results) -> list[str]:
    """Per method and measure: the spread over every replicate split into its part between
    hosts and within a host (:func:`~modecl.core.metrics.variance_split`); no rows unless
    the run has several hosts and several seeds."""
    groups = host_groups(results)
    if len(groups) < 2 or len(results.seeds) < 2:
        return []
    head = "| method | measure | mean | std | between hosts (std) | within a host (std) "
    rows = [head + "| share between hosts |", "|" + "---|" * 7]
    for name in results.mean.methods:
        for label, key, measure in SPREAD:
            values = [
                [
                    rep.methods[name].summary.get(key)
                    if key
                    else rep.methods[name].stages[-1].measures.get(measure)
                    for rep in reps
                ]
                for reps in groups.values()
            ]
            if any(v is None for g in values for v in g):
                continue
            split = variance_split(values)
            cells = [split[k] for k in ("mean", "std", "between_std", "within_std")]
            cells.append(split["between_share"])
            rows.append(f"| {name} | {label} | " + " | ".join(_fmt(c) for c in cells) + " |")
    return rows


def claims_lines(results: Results) -> list[str]:
    """The report's "Claims" section: each finding and in how many replicates it holds."""
    rows = claim_rows(tally([results]), len(results.per_seed))
    if len(rows) == 2:
        return []
    return [
        "## Claims",
        "",
        "Each finding as a rule checked on every replicate (a seed on a host): in how many",
        "of those it applies to it holds (`modecl claims RUN...` counts over several runs).",
        "'general': in every replicate.",
        "",
        *rows,
        "",
    ]


def write_report(out: str | Path) -> Path:
    """(Re)build ``report.md`` and ``figures/`` in ``out`` from its saved results."""
    out = Path(out)
    results = read_results(out / "results.json")
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    plot_matrices(results, figures / "accuracy_matrices.png")
    quick = " (QUICK run: a first look, not the benchmark)" if results.quick else ""
    title = (
        "digits benchmark"
        if results.front == "bench"
        else f"train on {results.inputs.get('model')}"
    )
    seeds, replicates = results.seeds, len(results.per_seed)
    rules = ", ".join(f"{t} ({results.scoring[t]})" for t in results.tasks)
    hosts = f"Hosts (host seeds): {results.hosts}; seeds on each: " if results.hosts else ""
    over = " (mean ± std over every replicate: a seed on a host)" if replicates > 1 else ""
    lines = [
        f"# modecl {title}{quick}",
        "",
        f"Tasks in order, with their scoring rules: {rules}. {hosts or 'Seeds: '}{seeds}{over}.",
    ]
    judge = results.world.get("judge")
    if judge:
        lines.append(
            f"Judge accuracy on real test images {judge['real_accuracy']:.3f}, "
            f"on codebook reconstructions {judge['reconstructed_accuracy']:.3f}."
        )
    lines += [
        "",
        "Accuracies are each task's test set under its scoring rule; 'constr.' restricts each",
        "answer to its closed answer set (options, or the task's answers), picked by likelihood.",
        "World measures (captioning, generation, FD, image NLL, CLIP, KID) are after the last",
        "task.",
        "",
        *headline_rows(results),
        "",
    ]
    present = {c[1]: c for c in _measures_present(results)}
    curve = next((present[k] for k in CURVES if k in present), None)
    if curve is not None:
        plot_generation(results, curve[1], curve[0], figures / "generation.png")
        lines += ["![generation after each task](figures/generation.png)", ""]
    lines += ["![accuracy matrices](figures/accuracy_matrices.png)", ""]
    if _has_constrained(results):
        plot_matrices(results, figures / "constrained_accuracy_matrices.png", constrained=True)
        lines += ["![constrained accuracy matrices](figures/constrained_accuracy_matrices.png)", ""]
    plot_losses(results, figures / "losses.png")
    lines += ["![training losses](figures/losses.png)", ""]
    if routed_methods(results):
        plot_routing(results, figures / "routing.png")
        lines += [
            "Expert use per task: the router's mean weight per expert on each task's test",
            "tokens (those it routes) after the last task, and its entropy over the experts",
            "normalized by log N (1: uniform, every expert alike; 0: one expert) after each.",
            "",
            "![expert use per task](figures/routing.png)",
            "",
        ]
    spread = spread_rows(results)
    if spread:
        lines += [
            "## Between hosts and within a host",
            "",
            "The spread over every replicate, split (one-way analysis of variance) into the",
            "std of the host means and the pooled std of the seeds on one host; the last",
            "column is the between-host share of the sum of squares.",
            "",
            *spread,
            "",
        ]
    lines += claims_lines(results)
    lines += generation_lines(results)
    series_file = out / "conflict.jsonl"
    text = series_file.read_text() if series_file.exists() else ""
    series = [json.loads(line) for line in text.splitlines()]
    if series:
        plot_conflict(series, figures / "conflict.png")
        lines += [
            "## Gradient conflict",
            "",
            "On every monitored step: the cosine between the gradient of the image loss",
            "(teacher-forced NLL of held-out image-generation pairs) and that of the task's",
            "cross-entropy, by parameter group, and the image loss's change across the step,",
            "predicted to first order (<grad L_image, Δθ>, Δθ the optimizer's real update) and",
            "measured. Cosines are means over monitored steps and tasks; changes are sums over",
            "the monitored steps only (one step in `continual.monitor.every`). 'SGD formula' is",
            "the paper's -lr <grad L_image, grad L_text>: what the change would be if the step",
            "were plain SGD on the task loss alone; its corr. is with the measured change.",
            "",
            *conflict_rows(results),
            "",
            "![gradient conflict](figures/conflict.png)",
            "",
        ]
        sites = site_changes(results)
        if sites:
            plot_conflict_sites(sites, figures / "conflict_sites.png")
            lines += [
                "Which parameters carry it: the predicted change (<grad L_image, Δθ> over each",
                "site's parameters) summed over the monitored steps of every task, by decoder",
                "layer, by adapted module and by branch; each split adds up to the total.",
                "",
                "![where the change sits](figures/conflict_sites.png)",
                "",
            ]
    samples = np.load(out / "samples.npz") if (out / "samples.npz").exists() else {}
    for name in results.mean.methods:
        lines += [
            f"## {name}",
            "",
            "Accuracy matrix (row: after that task; column: task measured):",
            "",
        ]
        lines += matrix_rows(results, name)
        if _has_constrained(results):
            lines += ["", "Constrained accuracy matrix:", ""]
            lines += matrix_rows(results, name, constrained=True)
        lines.append("")
        if "pretrained" in samples or f"{name}/stage1" in samples:
            plot_samples(results, samples, name, figures / f"samples_{name}.png")
            lines += [f"![samples](figures/samples_{name}.png)", ""]
    write_atomic(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"
