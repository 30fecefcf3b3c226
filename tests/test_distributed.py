"""Data-parallel training: two CPU processes (torchrun, gloo) against one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.ddp_worker import train

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(ROOT / "tests/ddp_worker.py"), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=280)
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
