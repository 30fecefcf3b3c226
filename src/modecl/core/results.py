"""The results schema (``modecl.results/2``), one writer and one reader for both front doors.

A run's ``results.json`` is a :class:`Results`: the accuracy matrices of every method and
seed, their forgetting measures, each stage's world measures (captioning, generation, image
NLL, CLIP, ...), the mean over seeds and its standard deviation.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modecl.core.config import ConfigError, from_dict
from modecl.core.files import finite, read_text, write_atomic
from modecl.core.metrics import mean_std, summarize

SCHEMA = "modecl.results/2"


@dataclass
class Stage:
    """Everything measured after one stage (``task`` is "pretrained" for stage 0)."""

    task: str
    task_accuracy: list[float]
    constrained_task_accuracy: list[float | None]  # None: a task with no closed answer set
    measures: dict[str, Any] = field(default_factory=dict)  # the world's own
    train_seconds: float = 0.0
    final_loss: float | None = None  # None: not finite (a diverged run)
    losses: dict[str, list[float | None]] = field(default_factory=dict)  # "ce" and each loss term
    wall_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    conflict: dict[str, Any] | None = None
    # Adapters with a router: per task, the mean expert share and normalized entropy of the
    # router over its test tokens (per layer and averaged; `evaluate.router_summary`)
    routing: dict[str, Any] | None = None


@dataclass
class MethodResult:
    accuracy_matrix: list[list[float]]
    constrained_accuracy_matrix: list[list[float | None]]
    summary: dict[str, float | None]  # final_average_accuracy, ..., constrained_...
    stages: list[Stage]


@dataclass
class SeedResult:
    """One replicate's results (a seed on a host), or the mean over replicates."""

    seed: int | None  # None for the mean over replicates
    pretrained: Stage
    methods: dict[str, MethodResult]
    # What identifies the host model it ran on, where the world says (the digits host:
    # seed, config hash, CPU kernel path it was pre-trained under, weights' SHA-256, source)
    host: dict[str, Any] | None = None


@dataclass
class Results:
    schema: str
    front: str  # "bench" or "train": the command that ran it
    quick: bool
    tasks: list[str]
    scoring: dict[str, str]
    seeds: list[int]
    config: dict[str, Any]
    inputs: dict[str, Any]  # what the run read (model, task and pairs files); {} for bench
    world: dict[str, Any]  # judge, host model facts
    per_seed: list[SeedResult]  # every replicate, host by host
    mean: SeedResult
    std: dict[str, Any] | None  # mean's shape, each number's std over replicates; None: one
    # What the numbers came from: per task and split the sample count and a hash of the
    # samples, the package versions (see modecl.core.runner.manifest)
    manifest: dict[str, Any] = field(default_factory=dict)
    hosts: list[int] | None = None  # host labels of a run over several hosts; None: one host


def method_result(stages: list[Stage], pretrained: Stage) -> MethodResult:
    """The accuracy matrices and their forgetting measures (constrained when every task has
    a closed answer set)."""
    exact = [s.task_accuracy for s in stages]
    constrained = [s.constrained_task_accuracy for s in stages]
    summary: dict[str, float | None] = dict(summarize(exact, pretrained.task_accuracy))
    rows = [*constrained, pretrained.constrained_task_accuracy]
    if all(v is not None for row in rows for v in row):
        measures = summarize(constrained, pretrained.constrained_task_accuracy)
    else:
        measures = dict.fromkeys(summary)
    summary |= {f"constrained_{k}": v for k, v in measures.items()}
    return MethodResult(exact, constrained, summary, stages)


def _mean_std_tree(values: list[Any]) -> tuple[Any, Any]:
    """Element-wise mean and std over seeds of equally shaped JSON trees of numbers."""
    first = values[0]
    if isinstance(first, dict):
        pairs = {k: _mean_std_tree([v[k] for v in values]) for k in first}
        return {k: m for k, (m, _) in pairs.items()}, {k: s for k, (_, s) in pairs.items()}
    if isinstance(first, list):
        if len({len(v) for v in values}) > 1:  # e.g. per-step losses of unequal length
            return first, None
        pairs = [_mean_std_tree(list(items)) for items in zip(*values, strict=True)]
        return [m for m, _ in pairs], [s for _, s in pairs]
    if isinstance(first, bool) or not isinstance(first, int | float) or None in values:
        return first, None
    return mean_std([float(v) for v in values])


def aggregate(per_seed: list[SeedResult]) -> tuple[SeedResult, dict[str, Any] | None]:
    """The mean over replicates (a SeedResult with seed and host None) and the std tree
    (None: one replicate)."""
    if len(per_seed) == 1:
        return per_seed[0], None
    trees = [dataclasses.asdict(r) | {"seed": None, "host": None} for r in per_seed]
    mean, std = _mean_std_tree(trees)
    return from_dict(SeedResult, mean), std


def write_results(path: Path, results: Results) -> None:
    """Write ``results`` as JSON, atomically."""
    tree = finite(dataclasses.asdict(results))  # strict JSON: NaN and infinities as null
    write_atomic(Path(path), json.dumps(tree, indent=1, allow_nan=False))


def read_results(path: Path) -> Results:
    """Read a results.json written by :func:`write_results`; a file of another schema, or
    one that does not parse, raises ConfigError naming it."""
    path = Path(path)
    try:
        data = json.loads(read_text(path, ConfigError, limit=2**31))
    except (json.JSONDecodeError, RecursionError) as err:
        raise ConfigError(f"{path}: not a complete results file ({err})") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema != SCHEMA:
        raise ConfigError(f"{path}: schema {schema!r}, expected {SCHEMA!r}; rerun the command")
    try:
        return from_dict(Results, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


COSTS = ("wall_seconds", "peak_memory_mb", "train_seconds")


def comparable(results: Results) -> dict[str, Any]:
    """Every number of ``results`` but what differs between two runs of the same config:
    the costs (:data:`COSTS`, wherever they occur) and the host's log (trained or loaded)."""

    def strip(tree: Any) -> Any:
        if isinstance(tree, dict):
            return {k: strip(v) for k, v in tree.items() if k not in COSTS}
        if isinstance(tree, list):
            return [strip(v) for v in tree]
        return tree

    tree = strip(json.loads(json.dumps(dataclasses.asdict(results))))
    tree["world"].pop("host", None)
    return tree
