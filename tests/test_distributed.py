"""Data-parallel training: two CPU processes (torchrun, gloo) against one process."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest
import torch

from modecl.cli import main
from modecl.core.results import read_results
from tests.ddp_worker import train
from tests.fixtures import ROOT, TRAIN_CONFIG, subprocess_env, torchrun, write_host, write_tasks

ENV = subprocess_env()


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    command = [*torchrun(), str(ROOT / "tests/ddp_worker.py"), str(tmp_path)]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["backend"] == "gloo"
    # Every process ends with the same adapters (DDP averaged the same gradients).
    for name, value in ranks[0]["adapters"].items():
        assert torch.equal(value, ranks[1]["adapters"][name]), name

    one = train(None)
    assert len(one["loss"]) == 3 and len(one["kd"]) == 3
    for rank in ranks:  # the logged losses are those of the whole global batch
        assert rank["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert rank["kd"] == pytest.approx(one["kd"], rel=1e-3, abs=1e-7)
    for name, value in one["adapters"].items():
        assert not torch.equal(value, one["init"][name]), f"{name} did not train"
        # Three AdamW steps of lr 0.01 from the same init: equal up to float summation order.
        torch.testing.assert_close(ranks[0]["adapters"][name], value, atol=1e-4, rtol=1e-4)


def test_modecl_train_under_torchrun_matches_one_process(tmp_path):
    """The CLI under two processes: sharded training and evaluation, the one-process results."""
    host = write_host("chameleon", tmp_path / "host")
    files, pairs = write_tasks(tmp_path / "data")
    config = tmp_path / "train.toml"
    # No dropout: its masks differ between processes.
    config.write_text(TRAIN_CONFIG + "[continual.adapter]\ndropout = 0.0\n")
    args = ["train", "--model", str(host), "--tasks", *map(str, files), "--method", "mode"]
    args += ["--kd-data", str(pairs), "--config", str(config)]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    done = subprocess.run(
        [*torchrun(), "-m", "modecl.cli", *args, "--out", str(tmp_path / "two")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (read_results(tmp_path / d / "results.json").mean for d in ("one", "two"))
    assert two.methods["mode"].accuracy_matrix == one.methods["mode"].accuracy_matrix
    pairs = zip(two.methods["mode"].stages, one.methods["mode"].stages, strict=True)
    for a, b in pairs:
        assert a.final_loss == pytest.approx(b.final_loss, rel=1e-5)
        assert a.measures["image_nll"] == pytest.approx(b.measures["image_nll"], rel=1e-5)
        assert (
            a.measures["pairs_generation"]["drawn"] == b.measures["pairs_generation"]["drawn"] == 2
        )
    for stage in ("stage1", "stage2"):
        path = pathlib.Path("checkpoints", "seed0", "mode", stage, "stage.json")
        answers = [json.loads((tmp_path / d / path).read_text())["answers"] for d in ("one", "two")]
        assert answers[0] == answers[1]
