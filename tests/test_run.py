"""The benchmark run: schema, resume after a crash, report, config errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import modecl.core.runner
from modecl.cli import main
from modecl.core.config import ConfigError, load_toml
from modecl.core.metrics import variance_split
from modecl.core.report import write_report
from modecl.core.results import comparable, read_results
from modecl.digits.bench import host_config, run_benchmark
from modecl.digits.config import RunConfig
from modecl.digits.host import Digits
from modecl.digits.pretrain import GateError, cache_key, load_or_pretrain
from tests.fixtures import BENCH_METHODS as METHODS
from tests.fixtures import BENCH_TASKS as TASKS
from tests.fixtures import tiny_run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("full")
    return out, run_benchmark(tiny_run(), out, cache_dir=cache, progress=False)


def test_results_schema(full_run):
    out, results = full_run
    assert read_results(out / "results.json") == results
    assert results.schema == "modecl.results/2" and results.front == "bench"
    assert results.quick is False and results.tasks == TASKS and results.seeds == [0]
    assert results.std is None and results.mean == results.per_seed[0]
    assert set(results.world["judge"]) == {"real_accuracy", "reconstructed_accuracy"}
    pre = results.mean.pretrained
    assert len(pre.task_accuracy) == len(TASKS) == len(pre.constrained_task_accuracy)
    for key in ("captioning_accuracy", "generation_accuracy", "frechet_distance", "image_nll"):
        assert isinstance(pre.measures[key], float)
    assert set(results.mean.methods) == set(METHODS)
    for entry in results.mean.methods.values():
        for matrix in (entry.accuracy_matrix, entry.constrained_accuracy_matrix):
            assert len(matrix) == len(TASKS)
            assert all(len(row) == len(TASKS) for row in matrix)
            assert all(0.0 <= v <= 1.0 for row in matrix for v in row)
        for key in ("final_average_accuracy", "average_forgetting", "bwt", "gain_kept"):
            assert key in entry.summary and f"constrained_{key}" in entry.summary
        assert entry.summary["constrained_final_average_accuracy"] is not None
        assert [s.task for s in entry.stages] == TASKS
        for stage in entry.stages:
            for key in ("captioning_accuracy", "generation_accuracy", "frechet_distance"):
                assert isinstance(stage.measures[key], float), key
            assert isinstance(stage.wall_seconds, float) and stage.peak_memory_mb > 0
            assert len(stage.losses["ce"]) == 2
            conflict = stage.conflict
            assert conflict["steps"] == 1 and isinstance(conflict["mean_cosine"], float)
            assert conflict["correlation"] is None  # one monitored step: undefined
    assert "kd" in results.mean.methods["mode"].stages[0].losses
    lines = [json.loads(line) for line in (out / "conflict.jsonl").read_text().splitlines()]
    assert len(lines) == len(METHODS) * len(TASKS)
    assert {(s["method"], s["stage"], s["step"]) for s in lines} == {
        (m, k, 0) for m in METHODS for k in (1, 2)
    }


def test_resume_after_a_crash_gives_the_same_results(full_run, tmp_path, cache, monkeypatch):
    _, uninterrupted = full_run
    real_train = modecl.core.runner.train_task
    calls = {"n": 0}

    def crashing_train(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # mid-way: the second method's second task
            raise KeyboardInterrupt("simulated crash")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(modecl.core.runner, "train_task", crashing_train)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(tiny_run(), tmp_path, cache_dir=cache, progress=False)
    assert not (tmp_path / "results.json").exists()
    stages = tmp_path.glob("checkpoints/*/*/stage*/stage.json")
    finished = sorted(p.parent.parent.name + "/" + p.parent.name for p in stages)
    assert finished == ["mode/stage1", "seq-lora/stage1", "seq-lora/stage2"]
    calls["n"] = -100  # no more crashes
    resumed = run_benchmark(tiny_run(), tmp_path, cache_dir=cache, progress=False)
    assert calls["n"] == -100 + 3  # only the unfinished stages were trained
    assert comparable(resumed) == comparable(uninterrupted)
    first = (full_run[0] / "conflict.jsonl").read_text()
    assert (tmp_path / "conflict.jsonl").read_text() == first


def test_cl_moe_o_lora_and_a_gem_resume_after_crashes_to_the_same_results(
    tmp_path, cache, monkeypatch
):
    """Their state past a task (CL-MoE's task gates, prototypes and last experts; A-GEM's
    memory) comes back from the stage: crashed in CL-MoE's second task, then in A-GEM's,
    the run ends as one never interrupted."""
    config = tiny_run(methods=["cl-moe", "o-lora", "a-gem"])
    whole = run_benchmark(config, tmp_path / "whole", cache_dir=cache, progress=False)
    real_train = modecl.core.runner.train_task
    trained = []

    def crashing_train(model, fmt, method, task, *args, **kwargs):
        trained.append((method.name, kwargs["index"]))
        if trained[-1] in crash:
            crash.remove(trained[-1])
            raise KeyboardInterrupt("simulated crash")
        return real_train(model, fmt, method, task, *args, **kwargs)

    monkeypatch.setattr(modecl.core.runner, "train_task", crashing_train)
    crash = [("cl-moe", 1), ("a-gem", 1)]
    for _ in crash[:]:
        with pytest.raises(KeyboardInterrupt):
            run_benchmark(config, tmp_path / "resumed", cache_dir=cache, progress=False)
    resumed = run_benchmark(config, tmp_path / "resumed", cache_dir=cache, progress=False)
    assert trained == [
        ("cl-moe", 0),
        ("cl-moe", 1),  # crash
        ("cl-moe", 1),
        ("o-lora", 0),
        ("o-lora", 1),
        ("a-gem", 0),
        ("a-gem", 1),  # crash
        ("a-gem", 1),
    ]
    assert comparable(resumed) == comparable(whole)
    # A-GEM's memory came back: the resumed task's steps had a reference gradient
    stages = resumed.mean.methods["a-gem"].stages
    assert "projected" not in stages[0].losses and len(stages[1].losses["projected"]) == 2


def test_report_is_rebuilt_from_saved_results(full_run):
    out, results = full_run
    report = write_report(out).read_text()
    for name in METHODS:
        assert f"## {name}" in report
        assert (out / "figures" / f"samples_{name}.png").stat().st_size > 1000
    figures = ("accuracy_matrices", "constrained_accuracy_matrices", "generation", "losses")
    for figure in (*figures, "conflict"):
        assert (out / "figures" / f"{figure}.png").exists()
    assert "## Gradient conflict" in report
    final = results.mean.methods["mode"].summary["final_average_accuracy"]
    assert f"| mode | {final:.3f} |" in report


def test_multi_seed_results_hold_each_seed_and_mean_std(tmp_path, cache):
    results = run_benchmark(
        tiny_run(methods=["seq-lora"], seeds=2), tmp_path, cache_dir=cache, progress=False
    )
    assert results.seeds == [0, 1] and len(results.per_seed) == 2
    values = [
        r.methods["seq-lora"].stages[-1].measures["generation_accuracy"] for r in results.per_seed
    ]
    assert results.mean.seed is None
    entry = results.mean.methods["seq-lora"]
    assert entry.stages[-1].measures["generation_accuracy"] == pytest.approx(sum(values) / 2)
    spread = results.std["methods"]["seq-lora"]["stages"][-1]["measures"]["generation_accuracy"]
    assert spread == pytest.approx(abs(values[0] - values[1]) / 2**0.5)


def test_a_run_over_hosts_repeats_every_method_on_each_host(tmp_path, cache, capsys):
    config = tiny_run(methods=["seq-lora", "mode"], seeds=2, hosts=2)
    results = run_benchmark(config, tmp_path, cache_dir=cache, progress=False, jobs=2)
    assert results.hosts == [0, 1] and results.seeds == [0, 1]
    assert [(r.host["seed"], r.seed) for r in results.per_seed] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in results.per_seed:
        assert r.host["config_hash"] == cache_key(host_config(config, r.host["seed"]))
        assert r.host["kernel_path"] == torch.backends.cpu.get_cpu_capability()
        assert not r.host["shipped"] and len(r.host["weights_sha256"]) == 64
    assert results.per_seed[0].host["weights_sha256"] != results.per_seed[2].host["weights_sha256"]
    assert results.mean.host is None
    assert results.manifest["launch"]["cpu_kernel_path"] == torch.backends.cpu.get_cpu_capability()
    folders = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert folders == ["host0-seed0", "host0-seed1", "host1-seed0", "host1-seed1"]
    # the mean is over all four (host, seed) replicates
    values = [r.methods["mode"].summary["average_forgetting"] for r in results.per_seed]
    assert results.mean.methods["mode"].summary["average_forgetting"] == pytest.approx(
        np.mean(values)
    )
    # host 0's replicates equal a run over host 0 alone, seed for seed
    alone = run_benchmark(
        tiny_run(methods=["seq-lora", "mode"], seeds=2),
        tmp_path / "alone",
        cache_dir=cache,
        progress=False,
    )
    assert [dataclasses.asdict(r.methods["mode"])["summary"] for r in alone.per_seed] == [
        dataclasses.asdict(r.methods["mode"])["summary"] for r in results.per_seed[:2]
    ]
    report = write_report(tmp_path).read_text()
    assert "Hosts (host seeds): [0, 1]; seeds on each: [0, 1]" in report
    assert "## Between hosts and within a host" in report
    split = variance_split([values[:2], values[2:]])
    assert f"| mode | forgetting | {split['mean']:.3f} | {split['std']:.3f} |" in report
    assert "## Claims" in report and "`mode-forgets-less`" in report
    assert main(["claims", str(tmp_path), str(tmp_path / "alone")]) == 0
    out = capsys.readouterr().out
    assert "6 replicates (a seed on a host) in 2 run(s):" in out
    holds = sum(
        r.methods["mode"].summary["average_forgetting"]
        < r.methods["seq-lora"].summary["average_forgetting"]
        for r in [*results.per_seed, *alone.per_seed]
    )
    assert (
        f"| `mode-forgets-less` | mode forgets less than seq-lora (exact) | {holds} of 6 |" in out
    )


def test_tracking_takes_a_tracker_as_a_string_as_accelerate_does(tmp_path, cache):
    file = tmp_path / "run.toml"
    file.write_text('methods = ["seq-lora"]\n[tracking]\nlog_with = "tensorboard"\n')
    assert load_toml(RunConfig, file).tracking.log_with == ["tensorboard"]
    config = tiny_run(methods=["seq-lora"], tracking={"log_with": "tensorboard"})
    run_benchmark(config, tmp_path / "out", cache_dir=cache, progress=False)
    (run,) = (tmp_path / "out" / "tracking").glob("*/")
    assert list(run.rglob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('methods = ["seq-lora", "modee"]', r"unknown method\(s\) \['modee'\]"),
        ('tasks = ["parity", "colour"]', r"unknown task\(s\) \['colour'\]"),
        ('methods = ["seq-lora", "seq-lora"]', r"methods repeat"),
        ("methods = []", r"methods: must not be empty"),
        ("[continual.train]\nepochs = 'ten'", r"continual\.train\.epochs: expected int"),
        ("[continual.train]\nepoch = 3", r"unknown key 'continual\.train\.epoch'"),
    ],
)
def test_config_errors_stop_before_any_training(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        config = load_toml(RunConfig, path)
        run_benchmark(config, tmp_path / "out", cache_dir=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_a_run_extends_with_more_methods_but_refuses_another_recipe(tmp_path, cache, monkeypatch):
    real_train = modecl.core.runner.train_task
    calls = []

    def counting_train(model, vocab, method, *args, **kwargs):
        calls.append(method.name)
        return real_train(model, vocab, method, *args, **kwargs)

    monkeypatch.setattr(modecl.core.runner, "train_task", counting_train)
    run_benchmark(tiny_run(methods=["seq-lora"]), tmp_path, cache_dir=cache, progress=False)
    extended = run_benchmark(
        tiny_run(methods=["seq-lora", "lwf"]), tmp_path, cache_dir=cache, progress=False
    )
    assert calls == ["seq-lora"] * len(TASKS) + ["lwf"] * len(TASKS)
    assert set(extended.mean.methods) == {"seq-lora", "lwf"}
    other = tiny_run(methods=["seq-lora"])
    other.continual.train.lr *= 2
    with pytest.raises(ConfigError, match="other settings"):
        run_benchmark(other, tmp_path, cache_dir=cache, progress=False)


def test_a_failed_gate_leaves_the_out_dir_unclaimed(tmp_path, cache):
    """The run key is written only once the host passed its gate: a corrected rerun runs."""
    strict = tiny_run(methods=["seq-lora"])
    strict.host.gate.captioning = 1.1  # no host can pass
    with pytest.raises(GateError):
        run_benchmark(strict, tmp_path, cache_dir=cache, progress=False)
    assert not (tmp_path / "run.json").exists()
    relaxed = tiny_run(methods=["seq-lora"])
    relaxed.host.gate.captioning = 0.0
    assert run_benchmark(relaxed, tmp_path, cache_dir=cache, progress=False).tasks == TASKS


def test_the_bench_gate_draws_as_many_images_per_digit_as_the_config_says(
    tmp_path, cache, monkeypatch
):
    """`modecl bench` judges the host as `modecl pretrain` does: `generation.samples_per_digit`
    drawings per digit (it drew 20, whatever the config said)."""
    config = tiny_run(methods=["seq-lora"])
    config.host.generation.samples_per_digit = 3
    config.host.gate.captioning = 1.1  # stop right after the gate
    load_or_pretrain(config.host, cache, progress=False)  # its validation draws too
    counts = []
    draw = Digits.draw_digits

    def counting(self, model, per_digit, seed):
        counts.append(per_digit)
        return draw(self, model, per_digit, seed)

    monkeypatch.setattr(Digits, "draw_digits", counting)
    with pytest.raises(GateError):
        run_benchmark(config, tmp_path, cache_dir=cache, progress=False)
    assert counts == [3]


def test_an_out_dir_of_the_earlier_schema_is_refused_with_a_message(tmp_path):
    (tmp_path / "run_config.json").write_text("{}")
    (tmp_path / "checkpoints" / "seed0" / "mode" / "stage1").mkdir(parents=True)
    with pytest.raises(ConfigError, match="earlier version of modecl"):
        run_benchmark(tiny_run(), tmp_path, cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()


def test_router_use_is_recorded_per_task_for_methods_with_a_router(full_run):
    results = full_run[1]
    assert results.mean.pretrained.routing is None
    for name, entry in results.mean.methods.items():
        for stage in entry.stages:
            if name != "mode":  # seq-lora and replay: one LoRA, no router
                assert stage.routing is None
                continue
            assert set(stage.routing) == set(TASKS)
            for use in stage.routing.values():
                assert len(use["shares"]) == 2 and sum(use["shares"]) == pytest.approx(1.0)
                assert 0.0 <= use["entropy"] <= 1.0
                assert len(use["layers"]) == 2 * 3  # 2 decoder layers x 3 projections
                for layer in use["layers"].values():
                    assert sum(layer["shares"]) == pytest.approx(1.0)
    report = write_report(full_run[0]).read_text()
    assert "![expert use per task](figures/routing.png)" in report
    assert (full_run[0] / "figures" / "routing.png").stat().st_size > 0
