"""Worker processes for the runner's independent units (a replicate and a method each).

Every (replicate, method) of a run is independent once the host is pre-trained: it
attaches its adapters to the frozen host, trains them through the tasks and writes each
stage atomically; measuring a replicate's pre-trained host (``HOST_STAGE``) is a unit too.
:func:`run_units` hands the units to ``jobs`` worker processes, which take units from a
shared queue until none are left. On Linux, with one torch thread in this
process (no OpenMP team to inherit), the workers are forked: they start at once with this
process's world, in the state a one-process run would have at its first unit. Otherwise
they are spawned, and each builds the worlds once with ``make_world``. The runner then reads
every stage back from disk, so the results do not depend on the number of workers or on
the order in which units finish::

    parent ── units ──► queue ──► worker 1: world, unit, unit, ...   ──► stage files
       ▲                     └──► worker 2: world, unit, ...         ──►
       └────── events (start / stage / done / failed) ◄─────────────────┘

A worker that fails stops the run with its unit and traceback; the other workers are
stopped and every stage they finished is kept. A worker dies with the parent (Linux), so a
killed run leaves no worker behind and resumes after the last finished stage of each unit.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing as mp
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from multiprocessing import connection
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

Unit = tuple[Any, str]  # (replicate, method), or (replicate, HOST_STAGE)
HOST_STAGE = "pretrained"  # the unit that measures a replicate's pre-trained host
Tick = Callable[[str], None]
WorkUnit = Callable[[Any, Unit, Tick], None]  # (world, unit, tick); module-level, picklable


class UnitFailed(RuntimeError):
    """A unit failed in a worker process (its replicate, method and traceback in the
    message)."""


def threads_per_worker() -> int:
    """Default torch threads of a process, and of each worker: the user's OMP_NUM_THREADS,
    else 1."""
    text = os.environ.get("OMP_NUM_THREADS", "")
    return int(text) if text.isdigit() and int(text) > 0 else 1


def usable_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores or 1, max(1, math.floor(quota)))
    return max(1, cores or 1)


def _cgroup_quota() -> float | None:
    """Cores allowed by the cgroup (v2 cpu.max, or v1 cfs quota / period); None if unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 else quota / period


def available_memory_mb() -> float | None:
    """MemAvailable of /proc/meminfo, in MiB; None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def default_jobs(units: int, worker_mb: float, threads: int = 1) -> int:
    """Workers for ``units`` units: the usable cores over each worker's ``threads``, capped
    by the available memory (``worker_mb`` per worker) and by the number of units."""
    jobs = usable_cores() // threads
    memory = available_memory_mb()
    if memory is not None:
        jobs = min(jobs, int(memory // worker_mb))
    return max(1, min(jobs, units))


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    # Not Linux: a killed run may leave its workers to finish their units.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def can_fork(threads: int) -> bool:
    """Whether workers may be forked: on Linux, from a process of one torch thread (no
    OpenMP team, which a forked child cannot use)."""
    return sys.platform == "linux" and threads == 1


_FORKED_WORLD: list[Any] = []  # the world a forked worker inherits


def _worker(
    make_world: Callable[[], Any] | None, work: WorkUnit, todo: Any, events: Any, threads: int
) -> None:
    """Take units from ``todo`` until None; report on ``events`` (a pipe: each message is
    written before this returns, so a worker that dies has said which unit it held)."""
    _die_with_parent()
    # The parent alone tells of an interrupt (Ctrl-C reaches the whole process group) and
    # stops the workers, whose SIGTERM ends them at once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(threads)
    try:
        world = _FORKED_WORLD[0] if make_world is None else make_world()
    except BaseException:
        events.send(("failed", None, traceback.format_exc()))
        return
    while (unit := todo.get()) is not None:
        events.send(("start", unit, ""))
        try:
            work(world, unit, lambda what, unit=unit: events.send(("stage", unit, what)))
        except BaseException:
            events.send(("failed", unit, traceback.format_exc()))
            return
        events.send(("done", unit, ""))


def _name(unit: Unit | None) -> str:
    if unit is None:
        return "building the world"
    what = "the pre-trained host" if unit[1] == HOST_STAGE else f"method {unit[1]}"
    return f"{unit[0]}, {what}"


def run_units(
    units: Sequence[Unit],
    world: Any,
    make_world: Callable[[], Any],
    work: WorkUnit,
    jobs: int,
    stages: int,
    progress: bool = True,
) -> None:
    """Run ``work`` on every unit in ``jobs`` worker processes, each with this process's
    number of torch threads; one bar of the ``stages`` done, with the units in flight.
    Raises :class:`UnitFailed` when a unit fails or a worker dies, after stopping the
    other workers."""
    threads = torch.get_num_threads()
    fork = can_fork(threads)
    ctx = mp.get_context("fork" if fork else "spawn")
    _FORKED_WORLD[:] = [world] if fork else []
    todo = ctx.Queue()
    workers, pipes = [], []
    for _ in range(jobs):
        reader, writer = ctx.Pipe(duplex=False)
        args = (None if fork else make_world, work, todo, writer, threads)
        workers.append(ctx.Process(target=_worker, args=args, daemon=True))
        pipes.append((reader, writer))
    for worker in workers:
        worker.start()
    for _, writer in pipes:
        writer.close()  # the worker's end: the reader sees EOF once the worker is gone
    for unit in [*units, *[None] * jobs]:  # after the fork: no queue thread to inherit
        todo.put(unit)
    bar = tqdm(total=stages, desc=f"stages ({jobs} workers)", unit="stage", disable=not progress)
    left, held = set(units), [None] * jobs  # each worker's unit in flight
    owner = {reader: i for i, (reader, _) in enumerate(pipes)}
    watch = [*owner, *(w.sentinel for w in workers)]
    try:
        while left:
            ready = connection.wait(watch, timeout=5)
            for reader in (r for r in ready if r in owner):  # messages before exits
                i = owner[reader]
                try:
                    kind, unit, text = reader.recv()
                except EOFError:
                    watch.remove(reader)
                    continue
                unit = None if unit is None else tuple(unit)
                if kind == "failed":
                    raise UnitFailed(f"{_name(unit)} failed in a worker process:\n{text}")
                held[i] = unit if kind in ("start", "stage") else None
                if kind == "stage":
                    bar.update()
                if kind == "done":
                    left.discard(unit)
            for i, worker in enumerate(workers):
                if worker.sentinel not in ready or worker.exitcode is None:
                    continue
                if worker.exitcode != 0 and pipes[i][0] not in watch:  # its messages read
                    unit = _name(held[i]) if held[i] else "no unit"
                    raise UnitFailed(
                        f"a worker process died (exit code {worker.exitcode}) while running {unit}"
                    )
                if worker.exitcode == 0 or pipes[i][0] not in watch:
                    watch.remove(worker.sentinel)
            bar.set_postfix_str(" | ".join(f"{u[0]} {u[1]}" for u in held if u))
    finally:
        _FORKED_WORLD.clear()
        bar.close()
        for worker in workers:
            if worker.is_alive() and left:
                worker.terminate()
        for worker in workers:
            worker.join()
