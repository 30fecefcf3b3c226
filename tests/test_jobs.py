"""The study in worker processes (`modecl bench --jobs`): one process's results whatever
the workers, a failing unit, a dead worker, a killed run that resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

import modecl.core.runner
from modecl.core import workers
from modecl.core.config import ContinualSettings
from modecl.core.report import write_report
from modecl.core.results import comparable, read_results
from modecl.core.runner import Replicate, RunSpec, worker_units
from modecl.core.workers import UnitFailed, default_jobs
from modecl.digits.bench import run_benchmark
from tests.fixtures import subprocess_env, tiny_run, tiny_study, toml

# Three epochs: units long enough for a kill to find workers in flight.
TRAIN = {"epochs": 3, "batch_size": 16, "max_train_samples": 32}


def study():
    data = tiny_study()
    data["continual"] = data["continual"] | {"train": TRAIN}
    return data


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("one")
    return out, run_benchmark(tiny_run(**study()), out, cache_dir=cache, progress=False)


def assert_same_run(out, one_out, results, one):
    """Every number but costs, the monitor's series, the drawn grids, the figures and the
    report (but its time column) equal those of one process."""
    assert comparable(results) == comparable(one)
    assert (out / "conflict.jsonl").read_text() == (one_out / "conflict.jsonl").read_text()
    with np.load(out / "samples.npz") as a, np.load(one_out / "samples.npz") as b:
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    reports = [write_report(d).read_text() for d in (out, one_out)]
    untimed = [[line.rsplit("|", 2)[0] for line in r.splitlines()] for r in reports]
    assert untimed[0] == untimed[1]
    figures = sorted(p.name for p in (one_out / "figures").iterdir())
    assert figures and figures == sorted(p.name for p in (out / "figures").iterdir())
    for name in figures:
        assert (out / "figures" / name).read_bytes() == (one_out / "figures" / name).read_bytes()


@pytest.mark.parametrize(
    ("cores", "quota", "threads", "memory_mb", "units", "jobs"),
    [
        (4, None, 1, 64_000, 10, 4),  # one worker per core
        (8, 2.5, 1, 64_000, 10, 2),  # a cgroup quota of 2.5 cores
        (8, None, 2, 64_000, 10, 4),  # two threads per worker
        (8, None, 1, 2_500, 10, 2),  # memory for two workers of 1 GiB
        (8, None, 1, 64_000, 3, 3),  # no more workers than units
        (2, None, 1, 500, 10, 1),  # never fewer than one
    ],
)
def test_default_jobs(monkeypatch, cores, quota, threads, memory_mb, units, jobs):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(workers, "_cgroup_quota", lambda: quota)
    monkeypatch.setattr(workers, "available_memory_mb", lambda: memory_mb)
    assert default_jobs(units, worker_mb=1024, threads=threads) == jobs


def test_spawned_workers_give_the_results_of_one_process(one_process, tmp_path, cache, monkeypatch):
    """Spawned workers (as where forking is unsafe) build their own world from the cache."""
    monkeypatch.setattr(workers, "can_fork", lambda threads: False)
    results = run_benchmark(tiny_run(**study()), tmp_path, cache_dir=cache, progress=False, jobs=2)
    assert_same_run(tmp_path, one_process[0], results, one_process[1])


def failing_train(fail):
    """`train_task` that calls ``fail`` for `mode`, once seq-lora has finished (forked
    workers inherit the patch)."""
    real = modecl.core.runner.train_task

    def train(model, fmt, method, *args, **kwargs):
        if method.name == "mode":
            fail()
        return real(model, fmt, method, *args, **kwargs)

    return train


def test_a_failing_unit_stops_the_run_and_keeps_what_others_finished(
    one_process, tmp_path, cache, monkeypatch
):
    done = tmp_path / "checkpoints/seed0/seq-lora/stage2/stage.json"

    def fail():
        deadline = time.monotonic() + 120
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise RuntimeError("planted failure")

    monkeypatch.setattr(modecl.core.runner, "train_task", failing_train(fail))
    with pytest.raises(UnitFailed, match="seed 0, method mode failed") as error:
        run_benchmark(tiny_run(**study()), tmp_path, cache_dir=cache, progress=False, jobs=2)
    assert "RuntimeError: planted failure" in str(error.value)
    assert done.exists() and not (tmp_path / "results.json").exists()
    assert not list(tmp_path.glob("checkpoints/seed0/mode/stage*/stage.json"))
    monkeypatch.undo()
    resumed = run_benchmark(tiny_run(**study()), tmp_path, cache_dir=cache, progress=False, jobs=2)
    assert_same_run(tmp_path, one_process[0], resumed, one_process[1])


def test_a_dead_worker_stops_the_run_with_its_unit(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(modecl.core.runner, "train_task", failing_train(lambda: os._exit(3)))
    with pytest.raises(UnitFailed, match=r"died \(exit code 3\) while running seed 0, method mode"):
        run_benchmark(tiny_run(**study()), tmp_path, cache_dir=cache, progress=False, jobs=2)


def interrupted_unit(world, unit, tick):
    """Ctrl-C as a terminal sends it, to the whole process group: this worker, the parent."""
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getppid(), signal.SIGINT)
    time.sleep(60)


def test_ctrl_c_stops_the_run_in_the_parent_which_stops_the_workers(ctrl_c):
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):  # not a unit that failed with it
        workers.run_units([("a", "x")], {}, dict, interrupted_unit, 1, 1, progress=False)
    assert time.monotonic() - started < 30


def test_a_run_killed_with_workers_in_flight_resumes_to_the_same_results(
    one_process, tmp_path, cache
):
    config = tmp_path / "study.toml"
    config.write_text(toml(study()))
    out = tmp_path / "out"
    args = ["bench", "--config", str(config), "--cache", str(cache), "--out", str(out)]
    command = [sys.executable, "-m", "modecl.cli", *args, "--jobs", "2"]
    run = subprocess.Popen(command, env=subprocess_env(), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(out.glob("checkpoints/seed0/*/stage1/stage.json")):
        assert run.poll() is None and time.monotonic() < deadline, "no stage finished"
        time.sleep(0.02)
    in_flight = psutil.Process(run.pid).children()
    run.send_signal(signal.SIGKILL)
    run.wait()
    finished = list(out.glob("checkpoints/seed0/*/stage*/stage.json"))
    assert len(in_flight) == 2 and 0 < len(finished) < 6
    assert not (out / "results.json").exists()
    _, alive = psutil.wait_procs(in_flight, timeout=30)  # they die with the run
    assert not alive
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(out, one_process[0], read_results(out / "results.json"), one_process[1])


def test_units_go_out_distillation_first_and_each_seeds_host_stage_last():
    spec = RunSpec(
        ["seq-lora", "mode", "ewc", "mode-task"], [0, 1], ContinualSettings(), "bench", {}, {}
    )
    a, b = Replicate(None, 0), Replicate(None, 1)
    assert worker_units(spec) == [
        (a, "mode"),
        (a, "mode-task"),
        (b, "mode"),
        (b, "mode-task"),
        (a, "seq-lora"),
        (a, "ewc"),
        (b, "seq-lora"),
        (b, "ewc"),
        (a, "pretrained"),
        (b, "pretrained"),
    ]


def test_a_run_over_hosts_has_a_unit_per_host_seed_and_method():
    spec = RunSpec(["seq-lora", "mode"], [0, 1], ContinualSettings(), "bench", {}, {}, hosts=[3, 5])
    reps = [Replicate(3, 0), Replicate(3, 1), Replicate(5, 0), Replicate(5, 1)]
    assert spec.replicates == reps
    assert [r.folder for r in reps] == ["host3-seed0", "host3-seed1", "host5-seed0", "host5-seed1"]
    assert worker_units(spec) == [
        *[(r, "mode") for r in reps],
        *[(r, "seq-lora") for r in reps],
        *[(r, "pretrained") for r in reps],
    ]
