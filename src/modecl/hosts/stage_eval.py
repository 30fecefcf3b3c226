"""`modecl eval`: score a saved stage of a `modecl train` run, without training.

The stage's adapters (``checkpoints/seed<S>/<method>/stage<K>/``) are attached to the run's
host and measured as the runner measures a stage: every task's answers, exact and
constrained accuracy, and, with a pairs or concepts file, the image-token NLL and the
drawings' scores. The inputs default to the run's own; other task files or CoIN folders,
pairs and concepts files can be given. The result is
written beside the run as ``eval/seed<S>-<method>-stage<K>.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modecl.core.adapters import attach_adapters, load_adapters
from modecl.core.config import ConfigError, from_dict
from modecl.core.files import finite, read_text, write_atomic
from modecl.core.methods import get_method
from modecl.core.processes import Processes
from modecl.core.runner import measure, pick_entry
from modecl.hosts.config import TrainConfig
from modecl.hosts.token_cache import TOKEN_STORE, TokenStore
from modecl.hosts.world import (
    InputFiles,
    check_inputs,
    default_accelerator,
    host_world,
    load_host,
)

__all__ = ["eval_stage"]


def eval_stage(
    run_dir: Path,
    task_files: list[Path] | None = None,
    kd_data: Path | None = None,
    *,
    image_root: Path | None = None,
    concepts: Path | None = None,
    seed: int | None = None,
    method: str | None = None,
    stage: int | None = None,
    out_file: Path | None = None,
    progress: bool = True,
    processes: Processes | None = None,
) -> dict[str, Any]:
    """Measure one finished stage of the run in ``run_dir`` (default: the first seed's
    last method's last stage) on ``task_files`` (default: the run's), in ``processes``
    (default: this launch's); returns what it wrote."""
    run_dir = Path(run_dir)
    key = json.loads(read_text(run_dir / "run.json", ConfigError))
    if key.get("front") != "train":
        raise ConfigError(f"{run_dir}: modecl eval scores runs of modecl train only")
    config = from_dict(TrainConfig, key["config"])
    inputs = key["inputs"]
    seeds = run_dir / "checkpoints"
    seed_dir = seeds / pick_entry(
        seeds, r"seed\d+", None if seed is None else f"seed{seed}", "seed"
    )
    method = pick_entry(seed_dir, r"(?!pretrained$)[^.].*", method, "method")
    method_dir = seed_dir / method
    stage_name = pick_entry(
        method_dir, r"stage\d+", None if stage is None else f"stage{stage}", "stage"
    )
    stage_dir = method_dir / stage_name
    if not (stage_dir / "stage.json").exists():
        raise ConfigError(f"{stage_dir}: not a finished stage")
    files = InputFiles.of(
        task_files or inputs["tasks"],
        kd_data if kd_data is not None else inputs.get("kd_data"),
        inputs.get("image_root") if task_files is None else image_root,
        inputs.get("concepts") if concepts is None and task_files is None else concepts,
    )
    cache = run_dir / TOKEN_STORE  # the run's images are not tokenized again
    tokenized = TokenStore(cache)  # ``path in`` it: a lookup in its index
    names = check_inputs(files, config, tokenized)
    processes = processes or Processes(default_accelerator())
    model, tokenizer = load_host(inputs["model"], config.host.dtype, processes.accelerator.device)
    world, tokens = host_world(
        model,
        tokenizer,
        model_path=inputs["model"],
        config=config,
        files=files,
        names=names,
        token_cache=cache,
        processes=processes,
        progress=progress and processes.main,
    )
    tokens.commit()
    # Sized for the run's sequence (per-task adapters), whatever tasks are scored now.
    sequence = len(inputs["tasks"])
    attach_adapters(model, get_method(method).adapter_config(config.continual, sequence))
    load_adapters(model, stage_dir / "adapters")
    number = int(stage_name.removeprefix("stage"))
    seed_value = int(seed_dir.name.removeprefix("seed"))
    images = run_dir / "eval" / "images" / f"{seed_dir.name}-{method}-{stage_name}"
    fields, answers, _ = measure(
        world, model, world.tasks(), seed_value * 1000 + number, images, processes
    )
    result = {
        "run": str(run_dir),
        "seed": seed_value,
        "method": method,
        "stage": number,
        "tasks": names,
        "task_files": [str(f) for f in files.tasks],
        "kd_data": None if files.kd_data is None else str(files.kd_data),
        "concepts": None if files.concepts is None else str(files.concepts),
        **fields,
        "answers": answers,
    }
    target = out_file or run_dir / "eval" / f"{seed_dir.name}-{method}-{stage_name}.json"
    if processes.main:
        write_atomic(Path(target), json.dumps(finite(result), indent=1, allow_nan=False))
    return result | {"file": str(target)}
