"""A benchmark run: methods x task sequence x seeds, measured after every task, resumable.

Layout of an out dir::

    results.json                      every number (schema ``modecl.results/1``)
    conflict.jsonl                    the gradient-conflict monitor's figures, one line per
                                      monitored step (seed, method, stage, task, step, ...)
    report.md, figures/*.png          built by :mod:`modecl.core.report`
    samples.npz                       drawn-image grids (codes) per method and stage
    checkpoints/seed<S>/pretrained.json
    checkpoints/seed<S>/<method>/stage<K>/{stage.json, adapters/, method.pt, grid.npy}

Each (method, stage) is written atomically once trained and measured; re-running the
same command resumes after the last finished stage and yields the same results. The
pre-trained host model is shared by all seeds; a seed changes adapter init, data order,
dropout and sampling.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from modecl.core.adapters import attach_adapters
from modecl.core.config import ConfigError, to_dict
from modecl.core.conflict import ConflictMonitor, summarize_conflict
from modecl.core.evaluate import constrained_accuracy, exact_accuracy
from modecl.core.files import write_atomic
from modecl.core.methods import METHOD_NAMES, get_method
from modecl.core.metrics import mean_std, summarize
from modecl.core.runner import peak_memory_mb, resumable, save_stage
from modecl.core.tasks import Task
from modecl.core.train import train_task
from modecl.digits.config import RunConfig
from modecl.digits.host import DigitsWorld
from modecl.digits.pretrain import check_gate, load_or_pretrain
from modecl.digits.tasks import TASK_RULES

SCHEMA = "modecl.results/1"
COST_KEYS = ("wall_seconds", "peak_memory_mb")
MATRIX_KEYS = ("task_accuracy", "constrained_task_accuracy")


def quick(config: RunConfig) -> RunConfig:
    """A smaller run for a first look: fewer epochs, samples and draws; still every method."""
    config = copy.deepcopy(config)
    config.continual.train.epochs = min(config.continual.train.epochs, 2)
    config.continual.train.max_train_samples = 64
    config.continual.distill.batch_size = min(config.continual.distill.batch_size, 8)
    config.eval.samples_per_digit = min(config.eval.samples_per_digit, 4)
    config.eval.max_test_samples = 60
    return config


def validate(config: RunConfig) -> None:
    """Stop before any work on an unknown method or task, or an empty sequence."""
    unknown = [m for m in config.methods if m not in METHOD_NAMES]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; valid methods: {', '.join(METHOD_NAMES)}")
    unknown = [t for t in config.tasks if t not in TASK_RULES]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; built-in tasks: {', '.join(TASK_RULES)}")
    if not config.tasks or not config.methods:
        raise ConfigError("a run needs at least one task and one method")
    if config.seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {config.seeds}")


def measure(
    world: DigitsWorld, model: torch.nn.Module, tasks: list[Task], config: RunConfig, seed: int
) -> tuple[dict[str, Any], np.ndarray]:
    """Every measure of one stage, and the grid of drawn images (codes) for the report."""
    model.eval()
    ev = config.eval
    codes, labels = world.draw_digits(model, ev.samples_per_digit, seed)
    grid = codes.reshape(10, ev.samples_per_digit, -1)[:, : ev.grid_per_digit]
    test = world.pools.test
    if ev.max_test_samples is not None:
        test = test[: ev.max_test_samples]
    return {
        "task_accuracy": [exact_accuracy(model, world.format, t.test) for t in tasks],
        "constrained_task_accuracy": [
            constrained_accuracy(model, world.format, t.test, t.answers) for t in tasks
        ],
        "captioning_accuracy": world.captioning_accuracy(model, test),
        "generation_accuracy": world.generation_accuracy(codes, labels),
        "frechet_distance": world.frechet_distance(codes),
        "image_nll": world.image_nll(model, test),
    }, grid


def run_method(
    name: str,
    world: DigitsWorld,
    host: torch.nn.Module,
    tasks: list[Task],
    config: RunConfig,
    seed: int,
    folder: Path,
    tick: Callable[[str], None],
    progress: bool,
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Train ``name`` through ``tasks`` from the host, resuming from finished stages."""
    method = get_method(name)
    method.setup(config.continual)
    model = copy.deepcopy(host)
    torch.manual_seed(seed)
    attach_adapters(model, method.adapter_config(config.continual))
    draw_pairs = world.draw_pairs(world.pools.train)
    watch = config.continual.monitor
    probe = world.draw_pairs(world.pools.test[: watch.probe_size])
    monitor = ConflictMonitor(world.format, probe, watch.every) if watch.enabled else None
    stages, grids = [], []
    for k, task, stage_dir, saved in resumable(folder, tasks, model, method):
        if saved is not None:
            stages.append(saved)
            grids.append(np.load(stage_dir / "grid.npy"))
            tick(f"{name} {task.name} (resumed)")
            continue
        start = time.perf_counter()
        log = train_task(
            model,
            world.format,
            method,
            task,
            config.continual,
            draw_pairs=draw_pairs,
            seed=seed * 1000 + k,
            progress=progress,
            desc=f"{name} {k + 1}/{len(tasks)} {task.name}",
            monitor=monitor,
        )
        measures, grid = measure(world, model, tasks, config, seed * 1000 + k + 1)
        stage = {
            "task": task.name,
            **measures,
            "train_seconds": log["seconds"],
            "final_loss": float(np.mean(log["loss"][-5:])),
            "wall_seconds": time.perf_counter() - start,
            "peak_memory_mb": peak_memory_mb(),
            "conflict": summarize_conflict(log["conflict"]),
            "conflict_steps": log["conflict"],  # kept in the checkpoint for conflict.jsonl
        }
        save_stage(stage_dir, stage, model, method, {"grid.npy": grid})
        stages.append(stage)
        grids.append(grid)
        tick(f"{name} {task.name}")
    return stages, grids


def method_summary(stages: list[dict], pretrained: dict) -> dict[str, Any]:
    """The accuracy matrices and their forgetting measures, plus the per-stage entries."""
    exact = [s["task_accuracy"] for s in stages]
    constrained = [s["constrained_task_accuracy"] for s in stages]
    out: dict[str, Any] = {"accuracy_matrix": exact, "constrained_accuracy_matrix": constrained}
    out |= summarize(exact, pretrained["task_accuracy"])
    out |= {
        f"constrained_{k}": v
        for k, v in summarize(constrained, pretrained["constrained_task_accuracy"]).items()
    }
    out["stages"] = [
        {k: v for k, v in s.items() if k not in (*MATRIX_KEYS, "conflict_steps")} for s in stages
    ]
    return out


def run_seed(
    config: RunConfig,
    world: DigitsWorld,
    host: torch.nn.Module,
    seed: int,
    out: Path,
    quick: bool,
    bar: tqdm,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, np.ndarray], list[dict[str, Any]]]:
    """One seed's results, drawn-image grids, and monitored steps (lines of conflict.jsonl)."""
    tasks = world.tasks(config.tasks)
    if config.eval.max_test_samples is not None:
        for t in tasks:
            t.test = t.test[: config.eval.max_test_samples]
    folder = out / "checkpoints" / f"seed{seed}"
    pre_file = folder / "pretrained.json"
    if pre_file.exists():
        pretrained = json.loads(pre_file.read_text())
        pre_grid = np.load(folder / "pretrained_grid.npy")
    else:
        pretrained, pre_grid = measure(world, host, tasks, config, seed * 1000)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "pretrained_grid.npy", pre_grid)
        write_atomic(pre_file, json.dumps(pretrained))
    grids = {"pretrained": pre_grid}

    def tick(what: str) -> None:
        bar.set_postfix_str(f"seed {seed}: {what}")
        bar.update()

    methods, series = {}, []
    for name in config.methods:
        stages, method_grids = run_method(
            name, world, host, tasks, config, seed, folder / name, tick, progress
        )
        methods[name] = method_summary(stages, pretrained)
        series += [
            {"seed": seed, "method": name, "stage": k + 1, "task": stage["task"], **step}
            for k, stage in enumerate(stages)
            for step in stage["conflict_steps"]
        ]
        for k, g in enumerate(method_grids):
            grids[f"{name}/stage{k + 1}"] = g
    result = {
        "schema": SCHEMA,
        "quick": quick,
        "config": to_dict(config),
        "seed": seed,
        "tasks": list(config.tasks),
        "judge": world.judge_report(),
        "pretrained": pretrained,
        "methods": methods,
    }
    return result, grids, series


def _mean_std_tree(values: list[Any]) -> tuple[Any, Any]:
    """Element-wise mean and std over seeds of equally shaped JSON trees of numbers."""
    first = values[0]
    if isinstance(first, dict):
        pairs = {k: _mean_std_tree([v[k] for v in values]) for k in first}
        return {k: m for k, (m, _) in pairs.items()}, {k: s for k, (_, s) in pairs.items()}
    if isinstance(first, list):
        pairs = [_mean_std_tree(list(items)) for items in zip(*values, strict=True)]
        return [m for m, _ in pairs], [s for _, s in pairs]
    if isinstance(first, bool) or not isinstance(first, int | float) or None in values:
        return first, None
    return mean_std([float(v) for v in values])


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Top-level numbers as means over seeds, each method's and the host's with a std sibling."""
    if len(per_seed) == 1:
        return per_seed[0]
    base = per_seed[0]
    pre_mean, pre_std = _mean_std_tree([r["pretrained"] for r in per_seed])
    methods = {}
    for name in base["methods"]:
        mean, std = _mean_std_tree([r["methods"][name] for r in per_seed])
        methods[name] = mean | {"std": std}
    judge, _ = _mean_std_tree([r["judge"] for r in per_seed])
    return {
        **{k: base[k] for k in ("schema", "quick", "config", "tasks")},
        "seed": [r["seed"] for r in per_seed],
        "judge": judge,
        "pretrained": pre_mean | {"std": pre_std},
        "methods": methods,
        "per_seed": per_seed,
    }


def _checkpoint_key(config: dict[str, Any]) -> dict[str, Any]:
    """What a (seed, method, stage) checkpoint depends on: all but the methods and seeds.

    So a finished run can be extended with more methods or seeds in the same out dir.
    """
    return {k: v for k, v in config.items() if k not in ("methods", "seeds")}


def run_benchmark(
    config: RunConfig,
    out: Path,
    *,
    quick: bool = False,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Pre-train or load the host (gated), run every method and seed, write results.json."""
    validate(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    saved_config = out / "run_config.json"
    if saved_config.exists() and _checkpoint_key(json.loads(saved_config.read_text())) != (
        _checkpoint_key(to_dict(config))
    ):
        raise ConfigError(
            f"{out} holds a run with another configuration ({saved_config}); "
            "use another --out or delete it"
        )
    write_atomic(saved_config, json.dumps(to_dict(config), indent=1))
    host = load_or_pretrain(config.host, cache_dir, progress)
    world, model = host.world, host.model
    check_gate(
        config.host,
        world.captioning_accuracy(model, world.pools.test),
        world.generation_accuracy(*world.draw_digits(model, 20, config.host.seed)),
    )
    total = config.seeds * len(config.methods) * len(config.tasks)
    bar = tqdm(total=total, desc="stages", unit="stage", disable=not progress)
    per_seed, all_grids, series = [], {}, []
    for seed in range(config.seeds):
        result, grids, steps = run_seed(config, world, model, seed, out, quick, bar, progress)
        per_seed.append(result)
        series += steps
        if seed == 0:
            all_grids = grids
    bar.close()
    results = aggregate(per_seed)
    results["host"] = {k: v for k, v in host.log.items() if k not in ("history", "config")}
    pixels = {k: world.codebook.decode(g.reshape(-1, g.shape[-1])) for k, g in all_grids.items()}
    pixels = {k: v.reshape(*all_grids[k].shape[:2], 8, 8) for k, v in pixels.items()}
    np.savez(out / ".samples.tmp.npz", **pixels)
    os.replace(out / ".samples.tmp.npz", out / "samples.npz")
    write_atomic(out / "conflict.jsonl", "".join(json.dumps(s) + "\n" for s in series))
    write_atomic(out / "results.json", json.dumps(results, indent=1))
    return results
