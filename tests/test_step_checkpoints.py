"""Resume inside a task: a `modecl train` killed with SIGKILL in the middle of a task resumes
from its last step checkpoint and ends with the results of a run never interrupted (in one
process, and in two under DDP and under DeepSpeed ZeRO-2); a kill at any instruction of a
step checkpoint's swap resumes from the newer or the older one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from modecl.core.adapters import attach_adapters
from modecl.core.config import ContinualSettings, from_dict
from modecl.core.files import remove_leftovers
from modecl.core.methods import get_method
from modecl.core.results import read_results
from modecl.core.train import train_task
from modecl.digits.model import build_model
from tests.conftest import tiny_config
from tests.fixtures import (
    TRAIN_CONFIG,
    ZERO2,
    subprocess_env,
    torchrun,
    write_host,
    write_tasks,
)

ENGINES = {"ddp": subprocess_env(), "zero2": subprocess_env(**ZERO2)}
# 20 epochs of 2 steps per task, a step checkpoint every 3 steps; no dropout (its masks
# differ between processes).
CONFIG = TRAIN_CONFIG.replace("epochs = 4", "epochs = 20\ncheckpoint_every = 3")
CONFIG += "[continual.adapter]\ndropout = 0.0\n"
STATE = Path("checkpoints", "seed0", "mode", "stage1.steps", "state.pt")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("steps")
    files, pairs = write_tasks(root / "data")
    (root / "train.toml").write_text(CONFIG)
    host = write_host("chameleon", root / "host")
    argv = ["train", "--model", str(host), "--tasks", *map(str, files), "--methods", "mode"]
    return [*argv, "--kd-data", str(pairs), "--config", str(root / "train.toml")]


def launch(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "modecl.cli"]
    return [*torchrun(processes), "-m", "modecl.cli"]


def run(processes: int, argv: list[str], out: Path, engine: str = "ddp") -> None:
    done = subprocess.run(
        [*launch(processes), *argv, "--out", str(out)],
        env=ENGINES[engine],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def killed_mid_task(processes: int, argv: list[str], out: Path, engine: str = "ddp") -> None:
    """Start the run; SIGKILL every process of it once the first step checkpoint exists."""
    started = subprocess.Popen(
        [*launch(processes), *argv, "--out", str(out)],
        env=ENGINES[engine],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not (out / STATE).exists() and started.poll() is None:
        assert time.monotonic() < deadline, "no step checkpoint was written"
        time.sleep(0.005)
    # torchrun starts its workers in sessions of their own: kill each process of the run.
    parent = psutil.Process(started.pid)
    for process in [parent, *parent.children(recursive=True)]:
        process.send_signal(signal.SIGKILL)
    started.wait()
    assert started.returncode != 0, "the run ended before it could be killed"
    assert not (out / "checkpoints" / "seed0" / "mode" / "stage1" / "stage.json").exists()


@pytest.mark.parametrize(("processes", "engine"), [(1, "ddp"), (2, "ddp"), (2, "zero2")])
def test_a_run_killed_inside_a_task_resumes_to_the_uninterrupted_results(
    inputs, tmp_path, processes, engine
):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run(processes, inputs, whole, engine)
    killed_mid_task(processes, inputs, resumed, engine)
    state = torch.load(resumed / STATE, weights_only=False)
    assert state["position"] % 3 == 0 and 0 < state["position"] < 40  # inside task 1's 40
    # Mark the logged first loss: a resume that uses the step checkpoint carries it over,
    # one that trains the task again from its start does not.
    state["log"]["loss"][0] = 123.0
    torch.save(state, resumed / STATE)
    run(processes, inputs, resumed, engine)
    assert not list(resumed.rglob("*.steps"))  # removed once their stage was written
    a, b = (read_results(d / "results.json").mean.methods["mode"] for d in (whole, resumed))
    assert b.stages[0].losses["ce"][0] == 123.0
    b.stages[0].losses["ce"][0] = a.stages[0].losses["ce"][0]
    assert a.accuracy_matrix == b.accuracy_matrix
    for x, y in zip(a.stages, b.stages, strict=True):
        assert x.losses == y.losses and x.measures["image_nll"] == y.measures["image_nll"]
    for stage in ("stage1", "stage2"):
        folder = Path("checkpoints", "seed0", "mode", stage)
        answers = [
            json.loads((d / folder / "stage.json").read_text())["answers"] for d in (whole, resumed)
        ]
        assert answers[0] == answers[1]
        weights = [
            load_file(d / folder / "adapters" / "adapters.safetensors") for d in (whole, resumed)
        ]
        assert weights[0].keys() == weights[1].keys()
        assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])


class Killed(BaseException):
    """A kill at one instruction of the swap: nothing after it runs."""


# 8 steps, a step checkpoint after steps 3 and 6: the second one swaps with the first.
SWAP = from_dict(
    ContinualSettings,
    {
        "adapter": {"rank": 2},
        "train": {"epochs": 1, "batch_size": 4, "max_train_samples": 32, "checkpoint_every": 3},
    },
)


def train_parity(digits, folder: Path) -> list[int]:
    """seq-lora on parity with step checkpoints in ``folder``; the steps it trained."""
    model = build_model(digits.vocab, tiny_config().model, seed=0)
    method = get_method("seq-lora")
    attach_adapters(model, method.adapter_config(SWAP))
    steps: list[int] = []
    task = digits.tasks(["parity"])[0]
    train_task(
        model,
        digits.format,
        method,
        task,
        SWAP,
        progress=False,
        checkpoint=folder,
        on_step=lambda n, values: steps.append(n),
    )
    return steps


@pytest.mark.parametrize(
    ("at", "resumed_from"),
    [("renaming the old aside", 3), ("renaming the new in", 3), ("deleting the old", 6)],
)
def test_a_kill_inside_the_swap_resumes_from_a_step_checkpoint(
    digits, tmp_path, monkeypatch, at, resumed_from
):
    folder = tmp_path / "stage1.steps"
    replace, rmtree = os.replace, shutil.rmtree
    swaps = []

    def killed_replace(src, dst):
        if Path(dst) == folder:
            swaps.append(src)
        if at == "renaming the old aside" and Path(src) == folder:
            raise Killed
        if at == "renaming the new in" and Path(dst) == folder and len(swaps) == 2:
            raise Killed
        replace(src, dst)

    def killed_rmtree(path, *args, **kwargs):
        if at == "deleting the old" and Path(path).name == ".stage1.steps.previous":
            raise Killed
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "replace", killed_replace)
    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    with pytest.raises(Killed):
        train_parity(digits, folder)
    monkeypatch.undo()
    remove_leftovers(tmp_path)  # as a resumed run does first
    assert train_parity(digits, folder) == list(range(resumed_from, 8))
    assert [p.name for p in tmp_path.iterdir()] == ["stage1.steps"]
