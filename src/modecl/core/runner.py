"""The one runner: (host, seed) x methods x tasks, each stage written atomically, resumable.

`modecl bench` (the digits world) and `modecl train` (a transformers host with task files)
are two front doors to :func:`run`. Each runs its pre-flight before it loads a host: the
runner's checks of the run (:func:`preflight`, once) and its own of its inputs; :func:`run`
takes the :class:`CheckedRun` and checks nothing again. A run repeats every method over
its replicates: each seed on each host (:class:`Replicate`; one host, the world's, unless
the front door gives several, as `modecl bench --hosts` does). Layout of an out dir
(``<R>`` a replicate's folder: ``seed<S>``, or ``host<H>-seed<S>`` in a run over several
hosts)::

    run.json                  what the run was started with (a resume must match it)
    results.json              every number (:mod:`modecl.core.results`, ``modecl.results/2``)
    conflict.jsonl            the gradient-conflict monitor's figures, one line per step
    samples.npz               the first seed's drawn-image grids per method and stage
    report.md, figures/       built by :mod:`modecl.core.report`
    checkpoints/<R>/pretrained/         stage.json (measures, answers), pictures.npy
    checkpoints/<R>/<method>/stage<K>/  stage.json, pictures.npy, adapters/, method.pt
    checkpoints/<R>/<method>/stage<K>.steps/  the step checkpoint inside an unfinished
                                        task (``train.checkpoint_every``)
    images/<R>/<method>/stage<K>/       drawn images, where the world decodes pixels

Each stage is written atomically once trained and measured; re-running the same command
resumes after the last finished stage of every (seed, method), or inside a task from its
last step checkpoint, and yields the same results.
Under several processes (accelerate) every process trains on its share of each batch and
answers its share of the test sets; the main process writes. The host's frozen weights are
shared by every method: each attaches its adapters to it and detaches them when done.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import resource
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from modecl.core.adapters import (
    adapter_layers,
    attach_adapters,
    detach_adapters,
    has_adapters,
    load_adapters,
    save_adapters,
)
from modecl.core.config import ConfigError, ContinualSettings
from modecl.core.conflict import ConflictMonitor, can_monitor, summarize_conflict
from modecl.core.evaluate import (
    answer,
    answer_set,
    constrained_choices,
    router_summary,
    router_use,
    scored_accuracy,
)
from modecl.core.files import (
    atomic_dir,
    atomic_path,
    check_writable,
    finite,
    remove_leftovers,
    write_atomic,
)
from modecl.core.methods import METHOD_NAMES, get_method
from modecl.core.methods.base import Method
from modecl.core.processes import ONE_PROCESS, Processes
from modecl.core.results import (
    SCHEMA,
    Results,
    SeedResult,
    Stage,
    aggregate,
    method_result,
    write_results,
)
from modecl.core.tasks import Sample, Samples, Task
from modecl.core.tracking import Tracking, check_trackers
from modecl.core.train import PROGRESS, check_engine, train_task
from modecl.core.workers import HOST_STAGE, Unit, run_units
from modecl.core.world import World


@dataclass(frozen=True)
class Replicate:
    """One repetition of every method: a seed on a host. ``host`` labels the host (the
    digits host's seed) in a run over several; None in a run over the world's one host."""

    host: int | None
    seed: int

    @property
    def folder(self) -> str:
        """Its folder under ``checkpoints/`` and ``images/``."""
        return f"seed{self.seed}" if self.host is None else f"host{self.host}-seed{self.seed}"

    def __str__(self) -> str:
        return f"seed {self.seed}" if self.host is None else f"host {self.host}, seed {self.seed}"


Worlds = Mapping[int | None, World]  # each host's world by its label (None: the one host)


@dataclass
class RunSpec:
    """What a run does on its worlds: methods x replicates under one recipe, and what to
    record."""

    methods: list[str]
    seed_list: list[int]  # the run seeds (configs and the command line give their count)
    continual: ContinualSettings
    front: str  # "bench" or "train"
    config: dict[str, Any]  # the front door's whole configuration, as recorded
    inputs: dict[str, Any]  # files the run reads (model, tasks, pairs); {} for bench
    quick: bool = False
    files: list[Path] = field(default_factory=list)  # input files, hashed into the run key
    tracking: list[str] = field(default_factory=list)  # accelerate trackers (core.tracking)
    hosts: list[int] | None = None  # host labels of a run over several hosts; None: one

    @property
    def replicates(self) -> list[Replicate]:
        """Every (host, seed), host by host."""
        return [Replicate(h, s) for h in self.hosts or [None] for s in self.seed_list]


def check_methods(methods: list[str], continual: ContinualSettings | None = None) -> None:
    """Stop on an unknown or repeated method name, or none at all, or (given the settings)
    a method whose adapters cannot be built from them, or ``expert_rank = "split"`` where no
    method has a routed branch to split."""
    if not methods:
        raise ConfigError(f"a run needs at least one method; valid: {', '.join(METHOD_NAMES)}")
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; valid methods: {', '.join(METHOD_NAMES)}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"methods repeat: {methods}")
    if continual is None:
        return
    routed = False
    for name in methods:
        try:
            routed |= get_method(name).adapter_config(continual).routed
        except ValueError as exc:
            raise ConfigError(f"method {name}: {exc} (continual)") from None
    if continual.adapter.expert_rank == "split" and not routed:
        raise ConfigError(
            "continual.adapter.expert_rank 'split' divides the rank among the experts of a "
            f"routed branch, and none of the methods {', '.join(methods)} has one (with "
            f"num_experts {continual.adapter.num_experts}): use 'full'"
        )


def pick_entry(folder: Path, pattern: str, wanted: str | None, what: str) -> str:
    """The entry of a run's ``folder`` matching ``pattern`` named ``wanted`` (default: the
    last in natural order); else a ConfigError naming what there is."""
    names = sorted(
        (p.name for p in folder.iterdir() if re.fullmatch(pattern, p.name)),
        key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)],
    )
    if wanted is None and names:
        return names[-1]
    if wanted not in names:
        raise ConfigError(f"{folder}: no {what} {wanted!r}; there are {names or 'none'}")
    return wanted


def file_hash(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks; a ConfigError where there is no file."""
    digest = hashlib.sha256()
    try:
        with Path(path).open("rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a file") from None
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"{path}: file not found") from None
    return digest.hexdigest()


def run_key(spec: RunSpec) -> dict[str, Any]:
    """What every stage of an out dir depends on: all but the methods and seeds (so a
    finished run can be extended with more of either) and the trackers, and the bytes of
    every input file."""
    config = {k: v for k, v in spec.config.items() if k not in ("methods", "seeds", "tracking")}
    hashes = {str(f): file_hash(f) for f in spec.files}
    return {"front": spec.front, "config": config, "inputs": spec.inputs, "hashes": hashes}


def check_run_key(out: Path, spec: RunSpec) -> None:
    """Refuse an out dir that is a file or cannot be written, or holds a run started with
    other settings or other input files (naming those that changed), before any work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, expected a folder for the run")
    check_writable(out, ConfigError)
    saved = out / "run.json"
    if not saved.exists():
        if (out / "run_config.json").exists() or (out / "checkpoints").exists():
            raise ConfigError(
                f"{out} holds a run of an earlier version of modecl (results schema 1), which "
                "this version cannot resume; use another --out or delete it"
            )
        return
    before, now = json.loads(saved.read_text()), run_key(spec)
    if before == now:
        return
    old = before.get("hashes", {})
    changed = [f for f, h in now["hashes"].items() if f in old and old[f] != h]
    if changed and {k: v for k, v in before.items() if k != "hashes"} == {
        k: v for k, v in now.items() if k != "hashes"
    }:
        raise ConfigError(
            f"{out} holds a run whose input files have changed since it started: "
            f"{', '.join(changed)}; restore them, or use another --out"
        )
    raise ConfigError(
        f"{out} holds a run started with other settings ({saved}); use another --out or delete it"
    )


@dataclass(frozen=True)
class CheckedRun:
    """A run past its pre-flight (:func:`preflight`): what :func:`run` takes."""

    spec: RunSpec
    out: Path
    processes: Processes
    jobs: int


def preflight(
    spec: RunSpec, out: Path, processes: Processes = ONE_PROCESS, *, jobs: int = 1
) -> CheckedRun:
    """Every check of a run that needs no world, each once, before any work; writes nothing.

    The methods (known, their adapters buildable from the settings), the experiment
    trackers, the engine (a DeepSpeed config the training loop can follow, its "auto"
    values filled in), the worker processes, and the out dir (writable, holding no run of
    other settings or inputs). A front door calls it before it loads a host, beside its own
    checks of its inputs.

    Args:
        spec: what the run does.
        out: its out dir.
        processes: the run's processes.
        jobs: worker processes for its units (:mod:`modecl.core.workers`).
    """
    check_methods(spec.methods, spec.continual)
    check_trackers(spec.tracking)
    check_engine(processes.accelerator, spec.continual, [get_method(m) for m in spec.methods])
    if jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {jobs}")
    if jobs > 1 and (processes.count > 1 or spec.tracking):
        raise ConfigError(
            f"jobs {jobs}: worker processes need one launched process and no experiment "
            "tracking (which logs from one process); use jobs 1"
        )
    check_run_key(out, spec)
    return CheckedRun(spec, Path(out), processes, jobs)


def content_digest(samples: Sequence[Sample]) -> str:
    """SHA-256 of the samples' content, ``json.dumps([[codes, question, answer, options],
    ...])``, fed one sample at a time: no copy of every sample's codes at once."""
    digest = hashlib.sha256(b"[")
    for i, s in enumerate(samples):
        item = [np.asarray(s.codes).tolist(), s.question, s.answer, s.options]
        digest.update((", " if i else "").encode() + json.dumps(item).encode())
    digest.update(b"]")
    if isinstance(samples, Samples):
        samples.release()
    return digest.hexdigest()


PACKAGES = ("modecl", "torch", "transformers", "accelerate", "numpy", "diffusers", "deepspeed")


def manifest(tasks: list[Task], processes: Processes = ONE_PROCESS) -> dict[str, Any]:
    """Per task and split: the number of samples and a SHA-256 of their content (image
    codes, question, answer, options); the versions of the packages that shaped them; the
    launch: processes, accelerate's distributed type, the ZeRO stage under DeepSpeed, and
    torch's CPU kernel path (``ATEN_CPU_CAPABILITY``: floats, and so trained adapters,
    differ between paths)."""
    splits = {}
    for task in tasks:
        splits[task.name] = {}
        for split, samples in (("train", task.train), ("test", task.test)):
            digest = content_digest(samples)
            splits[task.name][split] = {"samples": len(samples), "sha256": digest}
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    accelerator = processes.accelerator
    launch = {
        "processes": processes.count,
        "distributed_type": accelerator.distributed_type.value if accelerator else "NO",
        "zero_stage": processes.zero_stage,
        "cpu_kernel_path": torch.backends.cpu.get_cpu_capability(),
    }
    return {"tasks": splits, "packages": versions, "launch": launch}


def peak_memory_mb() -> float:
    """Peak memory so far: the GPU's allocator peak, else this process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_stage(folder: Path, entry: dict, model, method, pictures: np.ndarray | None) -> None:
    """Write one finished stage as a whole: a crash leaves it either complete or absent."""
    with atomic_dir(folder) as tmp:
        if model is not None:
            save_adapters(model, tmp / "adapters")
            with (tmp / "method.pt").open("wb") as file:  # a full disk: OSError, not torch's
                torch.save(method.state_dict(), file)
        if pictures is not None:
            np.save(tmp / "pictures.npy", pictures)
        (tmp / "stage.json").write_text(json.dumps(finite(entry), allow_nan=False))


def load_stage(folder: Path, model, method) -> None:
    """Put a finished stage's adapters and method state back, to resume after it."""
    load_adapters(model, folder / "adapters")
    method.load_state_dict(torch.load(folder / "method.pt", weights_only=False))


def resumable(
    folder: Path, tasks: list[Task], model: torch.nn.Module, method: Method
) -> Iterator[tuple[int, Task, Path, dict[str, Any] | None]]:
    """Each task's (k, task, stage dir, its saved entry, or None when it is to be run).

    Before the first stage to run, the last finished stage's adapters and method state are
    put back into ``model`` and ``method``.
    """
    last = None
    for k, task in enumerate(tasks):
        stage_dir = folder / f"stage{k + 1}"
        if (stage_dir / "stage.json").exists():
            last = stage_dir
            yield k, task, stage_dir, json.loads((stage_dir / "stage.json").read_text())
            continue
        if last is not None:
            load_stage(last, model, method)
            last = None
        yield k, task, stage_dir, None


def _sharded(items: list[Any], compute: Callable[[list[Any]], list[Any]], p: Processes) -> list:
    """``compute`` over ``items``, each process taking its share; every result, in order."""
    mine = list(range(p.rank, len(items), p.count))
    out: list[Any] = [None] * len(items)
    for index, results in p.gather([(mine, compute([items[i] for i in mine]))]):
        for i, value in zip(index, results, strict=True):
            out[i] = value
    return out


def measure(
    world: World, model: torch.nn.Module, tasks: list[Task], seed: int, images: Path, p: Processes
) -> tuple[dict[str, Any], dict[str, list[str]], np.ndarray | None]:
    """Task accuracies (mean credit under each task's rule; constrained), the router's use
    per task (where the adapters have a router), the world's measures, answers, pictures."""
    model.eval()
    fmt, how = world.format, world.answering
    exact, constrained, answers = [], [], {}
    for task in tasks:
        given = _sharded(
            task.test,
            lambda s: answer(model, fmt, s, how.max_new_tokens, how.batch_size),
            p,
        )
        answers[task.name] = given
        exact.append(scored_accuracy(task, given))
        sets = [answer_set(task, s) for s in task.test]
        if any(s is None for s in sets) or not sets:
            constrained.append(None)
            continue
        picks = _sharded(
            list(zip(task.test, sets, strict=True)),
            lambda part: constrained_choices(
                model, fmt, [s for s, _ in part], [c for _, c in part], how.batch_size
            ),
            p,
        )
        constrained.append(scored_accuracy(task, picks))
    routing = None
    if has_adapters(model) and any(layer.router for layer in adapter_layers(model).values()):
        routing = {}
        for task in tasks:
            parts = p.gather([router_use(model, fmt, p.share(task.test), how.batch_size)])
            routing[task.name] = router_summary(parts)
    measured = world.measure(model, seed, images, p)
    fields = {"task_accuracy": exact, "constrained_task_accuracy": constrained}
    fields["routing"] = routing
    return fields | {"measures": measured.measures}, answers, measured.pictures


def _pretrained(
    world: World, tasks: list[Task], rep: Replicate, out: Path, p: Processes
) -> tuple[Stage, np.ndarray | None]:
    folder = out / "checkpoints" / rep.folder / "pretrained"
    if not (folder / "stage.json").exists():
        images = out / "images" / rep.folder / "pretrained"
        fields, answers, pictures = measure(world, world.host, tasks, rep.seed * 1000, images, p)
        if p.main:
            entry = {"stage": {"task": "pretrained", **fields}, "answers": answers}
            save_stage(folder, entry, None, None, pictures)
        p.barrier()
    saved = json.loads((folder / "stage.json").read_text())
    pictures = np.load(folder / "pictures.npy") if (folder / "pictures.npy").exists() else None
    return Stage(**saved["stage"]), pictures


def _run_method(
    name: str,
    world: World,
    tasks: list[Task],
    spec: RunSpec,
    rep: Replicate,
    *,
    out: Path,
    p: Processes,
    tick: Callable[[str], None],
    progress: bool,
    tracker: Tracking | None = None,
) -> tuple[list[Stage], list[np.ndarray | None], list[dict[str, Any]]]:
    """Train ``name`` through ``tasks`` from the host, resuming from finished stages:
    its stages, their pictures and its monitored steps."""
    settings, model = spec.continual, world.host
    method = get_method(name)
    method.configure(settings, world.distill_pairs())
    torch.manual_seed(rep.seed)
    attach_adapters(model, method.adapter_config(settings, len(tasks)))
    watch = settings.monitor
    monitor, probe = None, world.probe_pairs(watch.probe_size) if watch.enabled else []
    if probe and can_monitor(p):
        monitor = ConflictMonitor(world.format, probe, watch.every)
    elif probe and p.main:
        message = "the conflict monitor runs in one process without DeepSpeed only: skipped"
        warnings.warn(message, stacklevel=2)
    folder = out / "checkpoints" / rep.folder / name
    stages, pictures, steps = [], [], []
    try:
        for k, task, stage_dir, saved in resumable(folder, tasks, model, method):
            if saved is None:
                done = sum(len(s.losses.get("ce", [])) for s in stages)  # steps so far
                track = None if tracker is None else _StageTracking(tracker, name, rep, done)
                PROGRESS.where, PROGRESS.task = f"{name}, {rep}", k + 1
                _train_stage(
                    world,
                    model,
                    method,
                    tasks,
                    k,
                    spec=spec,
                    seed=rep.seed,
                    stage_dir=stage_dir,
                    monitor=monitor,
                    p=p,
                    progress=progress,
                    track=track,
                )
                PROGRESS.task = None  # written: nothing of it is lost now
                saved = json.loads((stage_dir / "stage.json").read_text())
            stages.append(Stage(**saved["stage"]))
            file = stage_dir / "pictures.npy"
            pictures.append(np.load(file) if file.exists() else None)
            where = {"seed": rep.seed} if rep.host is None else {"host": rep.host, "seed": rep.seed}
            steps += [
                {**where, "method": name, "stage": k + 1, "task": task.name, **s}
                for s in saved["conflict_steps"]
            ]
            tick(f"{rep}: {name} {task.name}")
    finally:
        detach_adapters(model)
    return stages, pictures, steps


@dataclass
class _StageTracking:
    """What a tracker records of one (method, replicate): tags ``<method>/<R>/...`` (``R``
    the replicate's folder), steps counted through the whole sequence (``done`` steps
    before this stage)."""

    tracker: Tracking
    method: str
    rep: Replicate
    done: int

    @property
    def prefix(self) -> str:
        return f"{self.method}/{self.rep.folder}"

    def step(self, n: int, values: dict[str, float]) -> None:
        self.tracker.log({f"{self.prefix}/{k}": v for k, v in values.items()}, self.done + n)

    def stage(
        self, number: int, tasks: list[Task], stage: Stage, pictures: np.ndarray | None
    ) -> None:
        values = {f"accuracy/{t.name}": a for t, a in zip(tasks, stage.task_accuracy, strict=True)}
        values |= {
            f"measures/{k}": v
            for k, v in stage.measures.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        self.tracker.log({f"{self.prefix}/{k}": v for k, v in values.items()}, number)
        if pictures is not None:
            self.tracker.image(f"{self.prefix}/drawn", pictures, number)


def _train_stage(
    world: World,
    model: torch.nn.Module,
    method: Method,
    tasks: list[Task],
    k: int,
    *,
    spec: RunSpec,
    seed: int,
    stage_dir: Path,
    monitor: ConflictMonitor | None,
    p: Processes,
    progress: bool,
    track: _StageTracking | None = None,
) -> None:
    """Train task ``k`` of ``tasks`` with ``method`` on ``model`` (the host of ``world``,
    adapted), measure every task, write the stage into ``stage_dir`` (main process)."""
    task, start = tasks[k], time.perf_counter()
    log = train_task(
        model,
        world.format,
        method,
        task,
        spec.continual,
        seed=seed * 1000 + k,
        progress=progress,
        desc=f"{method.name} {k + 1}/{len(tasks)} {task.name}",
        monitor=monitor,
        processes=p,
        on_step=None if track is None else track.step,
        checkpoint=stage_dir.with_name(f"{stage_dir.name}.steps"),
        index=k,
    )
    images = Path(str(stage_dir).replace(f"{os.sep}checkpoints{os.sep}", f"{os.sep}images{os.sep}"))
    fields, answers, pictures = measure(world, model, tasks, seed * 1000 + k + 1, images, p)
    if p.main:
        stage = Stage(
            task=task.name,
            **fields,
            train_seconds=log["seconds"],
            final_loss=float(np.mean(log["loss"][-5:])),
            losses={"ce": log["loss"], **log["terms"]},
            wall_seconds=time.perf_counter() - start,
            peak_memory_mb=peak_memory_mb(),
            conflict=summarize_conflict(log["conflict"]) if monitor is not None else None,
        )
        entry = {
            "stage": dataclasses.asdict(stage),
            "answers": answers,
            "conflict_steps": log["conflict"],
        }
        save_stage(stage_dir, entry, model, method, pictures)
        shutil.rmtree(stage_dir.with_name(f"{stage_dir.name}.steps"), ignore_errors=True)
        if track is not None:
            track.stage(k + 1, tasks, stage, pictures)
    p.barrier()  # written before any process reads it


def worker_units(spec: RunSpec) -> list[Unit]:
    """The units of a run in worker processes, in the order they are handed out: the longest
    first, for the shortest finish (the image stream of distillation costs most), then the
    host's own stage of each replicate, short, beside the last units."""
    units = [(rep, name) for rep in spec.replicates for name in spec.methods]
    units.sort(key=lambda unit: not get_method(unit[1]).needs_pairs)
    return units + [(rep, HOST_STAGE) for rep in spec.replicates]


def _run_unit(spec: RunSpec, out: Path, worlds: Worlds, unit: Unit, tick: Callable) -> None:
    """One (replicate, method), or a replicate's pre-trained host stage, in a worker process
    (:mod:`modecl.core.workers`)."""
    rep, name = unit
    world = worlds[rep.host]
    if name == HOST_STAGE:
        _pretrained(world, world.tasks(), rep, out, ONE_PROCESS)
        return
    _run_method(
        name, world, world.tasks(), spec, rep, out=out, p=ONE_PROCESS, tick=tick, progress=False
    )


def run(
    worlds: World | Worlds,
    checked: CheckedRun,
    *,
    progress: bool = True,
    describe: dict[str, Any] | None = None,
    make_worlds: Callable[[], Worlds] | None = None,
) -> Results:
    """Every method and replicate of a run past its pre-flight through the tasks; writes
    run.json (now that the worlds loaded), every stage, results.json, conflict.jsonl and
    samples.npz.

    Args:
        worlds: one world, or (for ``spec.hosts``) each host's world by its label; they
            share the task sequence.
        checked: the run, from :func:`preflight`.
        progress: show progress bars.
        describe: the world's facts for results.json (default: the first world's).
        make_worlds: with ``checked.jobs`` > 1, the (replicate, method) units run in that
            many worker processes (:mod:`modecl.core.workers`: forked with ``worlds``, or
            spawned and building their own with ``make_worlds``, picklable), as do the
            host's stages of every replicate; the results are then read back from the
            stage files, the same as one process's.
    """
    spec, out, p, jobs = checked.spec, checked.out, checked.processes, checked.jobs
    worlds = worlds if isinstance(worlds, Mapping) else {None: worlds}
    if set(worlds) != set(spec.hosts or [None]):
        raise ValueError(f"worlds for hosts {sorted(worlds, key=str)}, the run has {spec.hosts}")
    if jobs > 1 and make_worlds is None:
        raise ValueError(f"jobs {jobs}: worker processes need make_worlds")
    PROGRESS.task = None  # in no task yet
    p.barrier()  # every process checked before the main one writes
    if p.main:
        remove_leftovers(out)  # of a write that a kill interrupted
        write_atomic(out / "run.json", json.dumps(run_key(spec), indent=1))
    tasks = next(iter(worlds.values())).tasks()
    tracker = Tracking(out, spec.tracking, spec.config) if p.main and spec.tracking else None
    total = len(spec.replicates) * len(spec.methods) * len(tasks)
    if jobs > 1:
        work = functools.partial(_run_unit, spec, out)
        run_units(worker_units(spec), worlds, make_worlds, work, jobs, total, progress)
    # After workers, every stage is done: the loop below only reads them back.
    shown = progress and p.main and jobs == 1
    with tqdm(total=total, desc="stages", unit="stage", disable=not shown) as bar:

        def tick(what: str) -> None:
            bar.set_postfix_str(what)
            bar.update()

        per_seed, series, samples = [], [], {}
        first = spec.replicates[0]
        for rep in spec.replicates:
            world = worlds[rep.host]
            pretrained, pictures = _pretrained(world, tasks, rep, out, p)
            if rep == first and pictures is not None:
                samples["pretrained"] = pictures
            methods = {}
            for name in spec.methods:
                stages, grids, steps = _run_method(
                    name,
                    world,
                    tasks,
                    spec,
                    rep,
                    out=out,
                    p=p,
                    tick=tick,
                    progress=progress,
                    tracker=tracker,
                )
                methods[name] = method_result(stages, pretrained)
                series += steps
                for k, grid in enumerate(grids):
                    if rep == first and grid is not None:
                        samples[f"{name}/stage{k + 1}"] = grid
            host = world.describe().get("host_identity")
            per_seed.append(SeedResult(rep.seed, pretrained, methods, host=host))
    if tracker is not None:
        tracker.close()
    mean, std = aggregate(per_seed)
    results = Results(
        schema=SCHEMA,
        front=spec.front,
        quick=spec.quick,
        tasks=[t.name for t in tasks],
        scoring={t.name: t.scoring for t in tasks},
        seeds=list(spec.seed_list),
        hosts=spec.hosts,
        config=spec.config,
        inputs=spec.inputs,
        world=describe if describe is not None else worlds[first.host].describe(),
        per_seed=per_seed,
        mean=mean,
        std=std,
        manifest=manifest(tasks, p),
    )
    if p.main:
        with atomic_path(out / "samples.npz") as tmp, tmp.open("wb") as file:
            np.savez(file, **samples)
        write_atomic(out / "conflict.jsonl", "".join(json.dumps(s) + "\n" for s in series))
        write_results(out / "results.json", results)
    return results
