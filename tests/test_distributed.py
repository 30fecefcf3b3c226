"""Data-parallel training: two CPU processes (torchrun, gloo) against one process, under DDP
and under DeepSpeed ZeRO-2 (chosen as `accelerate launch` chooses it, docs/scale-out.md),
and as two nodes of one process each (here on one machine)."""

from __future__ import annotations

import json
import pathlib
import subprocess

import numpy as np
import pytest
import torch

from modecl.cli import main
from modecl.core.config import ConfigError
from modecl.core.results import read_results
from modecl.hosts.world import default_accelerator
from tests.ddp_worker import train
from tests.fixtures import (
    ROOT,
    TRAIN_CONFIG,
    ZERO2,
    free_port,
    subprocess_env,
    torchrun,
    torchrun_node,
    write_host,
    write_tasks,
)

# engine: (its environment, accelerate's distributed type, the ZeRO stage)
# The shipped DeepSpeed JSON, the paper's code's kind: its "auto" values (batch sizes,
# clipping, accumulation, precision, the reduce bucket) filled in by accelerate and the loop.
ZERO2_JSON = {
    "ACCELERATE_USE_DEEPSPEED": "true",
    "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ROOT / "configs/accelerate/zero2.json"),
    "DS_ACCELERATOR": "cpu",
}
ENGINES = {
    "ddp": (subprocess_env(), "MULTI_CPU", None),
    "zero2": (subprocess_env(**ZERO2), "DEEPSPEED", 2),
    "zero2-json": (subprocess_env(**ZERO2_JSON), "DEEPSPEED", 2),
    "two-nodes": (subprocess_env(), "MULTI_CPU", None),  # torchrun --nnodes 2, DDP
}
# EWC: its Fisher is computed between tasks, outside the engine; CL-MoE merges its experts
# there too; O-LoRA: per-task LoRAs; A-GEM edits the gradient: DDP only (refused by ZeRO-2)
METHODS = ["mode", "ewc", "cl-moe", "o-lora", "a-gem"]
LAUNCHED = {"ddp": METHODS, "zero2": [m for m in METHODS if m != "a-gem"], "two-nodes": METHODS}


@pytest.fixture(scope="module")
def one_process() -> dict:
    return train(None)


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero2-json"])
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, one_process, engine):
    env, distributed_type, stage = ENGINES[engine]
    command = [*torchrun(), str(ROOT / "tests/ddp_worker.py"), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [(r["processes"], r["backend"]) for r in ranks] == [(2, "gloo")] * 2
    assert [(r["engine"], r["zero_stage"]) for r in ranks] == [(distributed_type, stage)] * 2
    # Every process ends with the same adapters (the engine averaged the same gradients;
    # ZeRO-2 gathered every process's updated partition).
    for name, value in ranks[0]["adapters"].items():
        assert torch.equal(value, ranks[1]["adapters"][name]), name

    one = one_process
    assert len(one["loss"]) == 3 and len(one["kd"]) == 3
    for rank in ranks:  # the logged losses and gradient norms are those of the global batch
        assert rank["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert rank["kd"] == pytest.approx(one["kd"], rel=1e-3, abs=1e-7)
        assert rank["norms"] == pytest.approx(one["norms"], rel=1e-5)
        # Resumed from the step checkpoint after step 2 (under ZeRO, each process took its own
        # partition of the optimizer state back): the uninterrupted run, bit for bit.
        assert rank["resumed"]["loss"] == rank["loss"]
        for name, value in rank["resumed"]["adapters"].items():
            assert torch.equal(value, ranks[0]["adapters"][name]), name
    for name, value in one["adapters"].items():
        assert not torch.equal(value, one["init"][name]), f"{name} did not train"
        # Three AdamW steps of lr 0.01 from the same init, clipped at train.grad_clip: equal
        # up to float summation order.
        torch.testing.assert_close(ranks[0]["adapters"][name], value, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def one_run(tmp_path_factory) -> tuple[list[str], pathlib.Path]:
    """`modecl train` arguments (`METHODS` on the tiny Chameleon) and its one-process run."""
    root = tmp_path_factory.mktemp("cli")
    host = write_host("chameleon", root / "host")
    files, pairs = write_tasks(root / "data")
    config = root / "train.toml"
    # No dropout: its masks differ between processes.
    config.write_text(TRAIN_CONFIG + "[continual.adapter]\ndropout = 0.0\n")
    args = ["train", "--model", str(host), "--tasks", *map(str, files)]
    args += ["--methods", ",".join(METHODS), "--kd-data", str(pairs), "--config", str(config)]
    assert main([*args, "--out", str(root / "one")]) == 0
    return args, root / "one"


def launched(engine: str, argv: list[str], logs: pathlib.Path) -> None:
    """`argv` under two processes: one torchrun, or one per node (two nodes on one machine)."""
    env = ENGINES[engine][0]
    starts = [torchrun()]
    if engine == "two-nodes":
        port = free_port()
        starts = [torchrun_node(node, port) for node in range(2)]
    started = []
    for k, start in enumerate(starts):
        with (logs / f"node{k}.log").open("w") as log:
            started.append(subprocess.Popen([*start, *argv], env=env, stderr=log))
    for k, process in enumerate(started):
        assert process.wait(timeout=280) == 0, (logs / f"node{k}.log").read_text()[-3000:]


@pytest.mark.parametrize("engine", ["ddp", "zero2", "two-nodes"])
def test_modecl_train_under_torchrun_matches_one_process(tmp_path, one_run, engine):
    """The CLI under two processes (two nodes of one): sharded training and evaluation, the
    one-process results."""
    args, one_dir = one_run
    _, distributed_type, stage = ENGINES[engine]
    methods = LAUNCHED[engine]
    args = [
        *args[: args.index("--methods") + 1],
        ",".join(methods),
        *args[args.index("--kd-data") :],
    ]
    launched(engine, ["-m", "modecl.cli", *args, "--out", str(tmp_path / "two")], tmp_path)
    one, two = (read_results(d / "results.json") for d in (one_dir, tmp_path / "two"))
    path = torch.backends.cpu.get_cpu_capability()
    assert one.manifest["launch"] == {
        "processes": 1,
        "distributed_type": "NO",
        "zero_stage": None,
        "cpu_kernel_path": path,
    }
    assert two.manifest["launch"] == {
        "processes": 2,
        "distributed_type": distributed_type,
        "zero_stage": stage,
        "cpu_kernel_path": path,
    }
    assert list(two.mean.methods) == methods
    for method in methods:
        a_method, b_method = two.mean.methods[method], one.mean.methods[method]
        assert a_method.accuracy_matrix == b_method.accuracy_matrix
        for a, b in zip(a_method.stages, b_method.stages, strict=True):
            assert a.final_loss == pytest.approx(b.final_loss, rel=1e-5)
            assert a.losses.keys() == b.losses.keys()
            for term, values in b.losses.items():  # ce, and kd, ewc, orthogonal, l2, projected
                assert a.losses[term] == pytest.approx(values, rel=1e-4, abs=1e-5), term
            assert a.measures["image_nll"] == pytest.approx(b.measures["image_nll"], rel=1e-5)
            drawn = [s.measures["pairs_generation"]["drawn"] for s in (a, b)]
            assert drawn == [2, 2]
        for stage_dir in ("stage1", "stage2"):
            path = pathlib.Path("checkpoints", "seed0", method, stage_dir, "stage.json")
            answers = [
                json.loads((d / path).read_text())["answers"] for d in (one_dir, tmp_path / "two")
            ]
            assert answers[0] == answers[1]
    assert "ewc" in two.mean.methods["ewc"].stages[1].losses  # the penalty of task 2
    assert "orthogonal" in two.mean.methods["o-lora"].stages[1].losses
    if "a-gem" in methods:  # it projected some of task 2's steps, alike in both processes
        assert 0 < np.mean(two.mean.methods["a-gem"].stages[1].losses["projected"]) < 1


def test_a_gem_under_zero2_is_refused_before_any_work(tmp_path, one_run):
    """DeepSpeed steps inside its backward: no gradient to project. Nothing is written."""
    args, _ = one_run
    args = [
        *args[: args.index("--methods") + 1],
        "seq-lora,a-gem",
        *args[args.index("--kd-data") :],
    ]
    done = subprocess.run(
        [*torchrun(), "-m", "modecl.cli", *args, "--out", str(tmp_path / "two")],
        env=ENGINES["zero2"][0],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode != 0
    assert "method a-gem projects each step's gradient, but DeepSpeed" in done.stderr
    assert not (tmp_path / "two").exists()


def test_deepspeed_without_a_launcher_is_refused(monkeypatch):
    """accelerate would run such a process on CPU without DeepSpeed, quietly."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ConfigError, match="no launcher started this process"):
        default_accelerator()
