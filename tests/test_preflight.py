"""Each front door (`modecl bench`, `modecl train`) runs every check once, before any work."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

import modecl.core.runner
import modecl.core.tracking
import modecl.core.train
import modecl.digits.bench
import modecl.hosts.world
from modecl.cli import main
from modecl.core.methods import get_method
from modecl.core.methods.distillation import check_pairs
from modecl.digits.bench import run_benchmark
from tests.fixtures import TRAIN_CONFIG, tiny_run, write_host, write_tasks

METHODS = ["seq-lora", "mode"]  # mode distils: its stream is checked too

# Every check of a run, and where it lives; a front door's pre-flight calls each once.
CHECKS = {
    "check_methods": modecl.core.runner.check_methods,
    "check_run_key": modecl.core.runner.check_run_key,
    "check_trackers": modecl.core.tracking.check_trackers,
    "check_engine": modecl.core.train.check_engine,
    "check_pairs": check_pairs,
}
BENCH_CHECKS = {"validate": modecl.digits.bench.validate}
TRAIN_CHECKS = {"check_inputs": modecl.hosts.world.check_inputs}


def record(log: Path, line: str) -> None:
    """One line in ``log``: a file, so that a forked child's calls (the inputs are read in
    one, :func:`modecl.hosts.world.in_child`) are counted too."""
    with log.open("a") as file:
        file.write(line + "\n")


def watch(monkeypatch, log: Path, out: Path, checks: dict, load: tuple) -> None:
    """Log every call of ``checks`` (and whether ``out`` held anything then), of each
    method's ``configure`` and of the host's loading (``load``: module, name), by whatever
    name a module of the package holds them."""
    for name, original in checks.items():

        def counted(*args, name=name, original=original, **kwargs):
            untouched = not out.exists() or not any(out.iterdir())
            record(log, f"{name} {'untouched' if untouched else 'written'}")
            return original(*args, **kwargs)

        for module in [m for k, m in sys.modules.items() if k.startswith("modecl")]:
            for attr, value in list(vars(module).items()):
                if value is original:
                    monkeypatch.setattr(module, attr, counted)
    kinds = {type(get_method(m)) for m in METHODS}
    originals = {kind: kind.configure for kind in kinds}
    for kind, original in originals.items():

        def configure(self, *args, original=original, **kwargs):
            record(log, f"configure {self.name}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(kind, "configure", configure)
    module, name = load
    loader = getattr(module, name)

    def loading(*args, **kwargs):
        record(log, "load")
        return loader(*args, **kwargs)

    monkeypatch.setattr(module, name, loading)


def check_log(log: Path, checks: dict) -> None:
    lines = log.read_text().splitlines()
    first_load = lines.index("load")
    before, after = lines[:first_load], lines[first_load:]
    assert Counter(before) == {f"{name} untouched": 1 for name in checks}, lines
    assert Counter(line for line in after if not line.startswith("configure")) == {"load": 1}
    assert Counter(line for line in after if line.startswith("configure")) == {
        f"configure {m}": 1 for m in METHODS
    }


def test_bench_runs_each_check_once_before_any_work(tmp_path, cache, monkeypatch):
    log, out = tmp_path / "calls.log", tmp_path / "out"
    checks = CHECKS | BENCH_CHECKS
    watch(monkeypatch, log, out, checks, (modecl.digits.bench, "load_or_pretrain"))
    run_benchmark(tiny_run(methods=METHODS), out, cache_dir=cache, progress=False)
    check_log(log, checks)


@pytest.fixture
def inputs(tmp_path):
    files, pairs = write_tasks(tmp_path / "data")
    host = write_host("chameleon", tmp_path / "host")
    config = tmp_path / "train.toml"
    config.write_text(TRAIN_CONFIG.replace("epochs = 4", "epochs = 1"))
    return files, pairs, host, config


def test_train_runs_each_check_once_before_any_work(tmp_path, inputs, monkeypatch):
    files, pairs, host, config = inputs
    log, out = tmp_path / "calls.log", tmp_path / "out"
    checks = CHECKS | TRAIN_CHECKS
    watch(monkeypatch, log, out, checks, (modecl.hosts.world, "load_host"))
    argv = ["train", "--model", str(host), "--tasks", *map(str, files), "--kd-data", str(pairs)]
    argv += ["--methods", ",".join(METHODS), "--config", str(config), "--out", str(out)]
    assert main(argv) == 0
    check_log(log, checks)
