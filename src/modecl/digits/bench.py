"""The digits benchmark as a world for the one runner (:mod:`modecl.core.runner`).

`modecl bench`: load (shipped or cached) or pre-train the gated digits hosts, then every
method and seed on every host through the built-in tasks, measuring after every task:
exact and constrained accuracy, captioning, generation accuracy (judge), Fréchet distance
and image-token NLL. A host is shared by the seeds run on it; a seed changes adapter init,
data order, dropout and sampling. ``hosts = N`` repeats the study on host seeds
``host.seed`` .. ``host.seed + N - 1``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Collection, Sequence
from functools import cached_property, partial
from pathlib import Path
from typing import Any

from torch import nn

from modecl.core.config import ConfigError, to_dict
from modecl.core.methods import get_method
from modecl.core.methods.distillation import check_pairs
from modecl.core.processes import Processes
from modecl.core.results import Results
from modecl.core.runner import CheckedRun, RunSpec, preflight, run
from modecl.core.sequences import DrawPair
from modecl.core.tasks import Task
from modecl.core.workers import default_jobs
from modecl.core.world import Answering, Measured
from modecl.digits.config import DigitsConfig, RunConfig
from modecl.digits.data import load_pools
from modecl.digits.format import DigitsFormat
from modecl.digits.pretrain import GateError, PretrainedHost, check_gate, load_or_pretrain
from modecl.digits.tasks import TASK_RULES

QUICK = {  # key -> (the quick value from the config's), a smaller first look
    "continual.train.epochs": lambda v: min(v, 2),
    "continual.train.max_train_samples": lambda v: 64,
    "continual.distill.batch_size": lambda v: min(v, 8),
    "eval.samples_per_digit": lambda v: min(v, 4),
    "eval.grid_per_digit": lambda v: min(v, 2),
    "eval.max_test_samples": lambda v: 60,
}


def quick(config: RunConfig, given: Collection[str] = ()) -> tuple[RunConfig, list[str]]:
    """A smaller run for a first look: fewer epochs, samples and draws; still every method.

    A key in ``given`` (set by the user's config) keeps the user's value; the returned notes
    say which, so that --quick never silently overrides a value the user set."""
    config, notes = copy.deepcopy(config), []
    for key, shrink in QUICK.items():
        *path, name = key.split(".")
        section = config
        for part in path:
            section = getattr(section, part)
        if key in given:
            notes.append(f"--quick keeps {key} = {getattr(section, name)!r} from your config")
        else:
            setattr(section, name, shrink(getattr(section, name)))
    return config, notes


def validate(config: RunConfig) -> None:
    """Stop before any work on an unknown or repeated task, an empty list of them, or fewer
    than one seed or host (the methods are the runner's to check: :func:`bench_preflight`)."""
    unknown = [t for t in config.tasks if t not in TASK_RULES]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; built-in tasks: {', '.join(TASK_RULES)}")
    if not config.tasks:
        raise ConfigError("a run needs at least one task")
    if config.seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {config.seeds}")
    if config.hosts < 1:
        raise ConfigError(f"hosts must be at least 1, got {config.hosts}")


class DigitsBench:
    """The digits world (:class:`modecl.core.world.World`) of a gated host and a run config."""

    answering = Answering(max_new_tokens=4, batch_size=256)

    def __init__(self, host: PretrainedHost, config: RunConfig) -> None:
        self._host, self.config = host, config
        self.digits = host.digits
        self.format: DigitsFormat = self.digits.format

    @property
    def host(self) -> nn.Module:
        return self._host.model

    def tasks(self) -> list[Task]:
        tasks = self.digits.tasks(self.config.tasks)
        limit = self.config.eval.max_test_samples
        if limit is not None:
            for t in tasks:
                t.test = t.test[:limit]
        return tasks

    @cached_property
    def _train_pairs(self) -> list[DrawPair]:
        return self.digits.draw_pairs(self.digits.pools.train)

    def distill_pairs(self) -> Sequence[DrawPair]:
        return self._train_pairs

    def probe_pairs(self, size: int) -> Sequence[DrawPair]:
        return self.digits.draw_pairs(self.digits.pools.test[:size])

    def measure(self, model: nn.Module, seed: int, images: Path, processes: Processes) -> Measured:
        ev, digits = self.config.eval, self.digits
        codes, labels = digits.draw_digits(model, ev.samples_per_digit, seed)
        grid = codes.reshape(10, ev.samples_per_digit, -1)[:, : ev.grid_per_digit]
        pixels = digits.codebook.decode(grid.reshape(-1, grid.shape[-1]))
        test = digits.pools.test
        if ev.max_test_samples is not None:
            test = test[: ev.max_test_samples]
        measures = {
            "captioning_accuracy": digits.captioning_accuracy(model, test),
            "generation_accuracy": digits.generation_accuracy(codes, labels),
            "frechet_distance": digits.frechet_distance(codes),
            "image_nll": digits.image_nll(model, test),
        }
        return Measured(measures, pixels.reshape(*grid.shape[:2], 8, 8))

    def describe(self) -> dict[str, Any]:
        log = {k: v for k, v in self._host.log.items() if k not in ("history", "config")}
        identity = self._host.identity()
        return {"judge": self.digits.judge_report(), "host": log, "host_identity": identity}


def host_seeds(config: RunConfig) -> list[int]:
    """The host seeds a run repeats on: ``host.seed`` and the next ``hosts - 1``."""
    return [config.host.seed + i for i in range(config.hosts)]


def _label(config: RunConfig, seed: int) -> int | None:
    """A host's label in the runner: its seed in a run over several hosts, else None (the
    out dir's folders are then ``seed<S>``, as a run over one host has always had)."""
    return seed if config.hosts > 1 else None


def host_config(config: RunConfig, seed: int) -> DigitsConfig:
    """The host settings of host seed ``seed``."""
    return dataclasses.replace(config.host, seed=seed)


def bench_spec(config: RunConfig, quick_run: bool, files: list[Path]) -> RunSpec:
    return RunSpec(
        methods=list(config.methods),
        seed_list=list(range(config.seeds)),
        hosts=host_seeds(config) if config.hosts > 1 else None,
        continual=config.continual,
        front="bench",
        config=to_dict(config),
        inputs={},
        quick=quick_run,
        files=files,
        tracking=list(config.tracking.log_with),
    )


def bench_preflight(
    config: RunConfig, out: Path, quick_run: bool, config_file: Path | None, jobs: int
) -> CheckedRun:
    """`modecl bench`'s pre-flight: every check of a run, each once, before a host loads;
    writes nothing. The config's tasks, seeds and hosts (:func:`validate`), the runner's
    checks (:func:`modecl.core.runner.preflight`: methods, trackers, workers, the out dir)
    and the distillation stream (the train pool's pairs fill a batch)."""
    validate(config)
    spec = bench_spec(config, quick_run, [Path(config_file)] if config_file else [])
    checked = preflight(spec, out, jobs=jobs)
    distilling = [m for m in config.methods if get_method(m).needs_pairs]
    if distilling:
        pairs = len(load_pools(config.host.data).train)  # the stream: the train pool's pairs
        check_pairs(distilling[0], pairs, config.continual.distill.batch_size)
    return checked


# A worker's resident memory is about 0.5 GiB (torch, the host, a method's adapters).
WORKER_MB = 1024


def bench_jobs(config: RunConfig, threads: int = 1) -> int:
    """Default workers of ``threads`` torch threads each: the usable cores over
    ``threads``, capped by memory and the number of units; 1 with experiment tracking (it
    logs from one process)."""
    units = len(config.methods) * config.seeds * config.hosts
    return 1 if config.tracking.log_with else default_jobs(units, WORKER_MB, threads)


def bench_worlds(config: RunConfig, cache_dir: Path | None) -> dict[int | None, DigitsBench]:
    """The worlds in a worker process: each host shipped, or from the cache the parent
    filled."""
    return {
        _label(config, seed): DigitsBench(
            load_or_pretrain(host_config(config, seed), cache_dir, False), config
        )
        for seed in host_seeds(config)
    }


def run_benchmark(
    config: RunConfig,
    out: Path,
    *,
    quick: bool = False,
    cache_dir: Path | None = None,
    progress: bool = True,
    config_file: Path | None = None,
    jobs: int = 1,
) -> Results:
    """Load or pre-train each host (gated), run every method and seed on each, write
    results.json.

    The out dir is checked first and written only once every host passed its gate.
    ``jobs``: worker processes for the (replicate, method) units (:func:`bench_jobs`
    chooses a default).
    """
    checked = bench_preflight(config, out, quick, config_file, jobs)
    worlds = {}
    for seed in host_seeds(config):
        host = load_or_pretrain(host_config(config, seed), cache_dir, progress)
        try:
            check_gate(host.digits.config, *host.gate_scores())
        except GateError as err:
            raise GateError(f"host seed {seed}: {err}") from None
        worlds[_label(config, seed)] = DigitsBench(host, config)
    make_worlds = partial(bench_worlds, config, cache_dir)
    return run(worlds, checked, progress=progress, make_worlds=make_worlds)
