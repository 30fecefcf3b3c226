"""The digits study in one process and in worker processes: wall time and equality.

Runs the same study twice in one process, on the cached (or first pre-trained) host: with
`jobs=1` and with the default jobs of `modecl bench` (usable cores over torch threads,
capped by memory and units). Each writes its own out dir under a temporary folder; the
host's pre-training is not timed. Then compares every number but costs (results.json),
the conflict monitor's series and the drawn grids.

    .venv/bin/python benchmarks/bench_jobs.py [--full] [--jobs N] [--config FILE]

Default: the `--quick` study of the default config. The last lines are `jobs=<N>`,
`jobs_speedup=<serial seconds / parallel seconds>` and `identical=<True|False>`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from modecl.core.config import load_toml
from modecl.core.results import Results, comparable
from modecl.digits.bench import bench_jobs, quick, run_benchmark
from modecl.digits.config import RunConfig
from modecl.digits.pretrain import load_or_pretrain


def same_outputs(a: Path, b: Path) -> bool:
    """The conflict series and the drawn grids of two out dirs are equal."""
    if (a / "conflict.jsonl").read_text() != (b / "conflict.jsonl").read_text():
        return False
    with np.load(a / "samples.npz") as x, np.load(b / "samples.npz") as y:
        return sorted(x) == sorted(y) and all(np.array_equal(x[k], y[k]) for k in x)


def unit_seconds(results: Results) -> dict[str, float]:
    """Each (seed, method) unit's stage wall seconds, summed: ``"seed/method" -> s``."""
    return {
        f"{r.seed}/{name}": sum(stage.wall_seconds for stage in method.stages)
        for r in results.per_seed
        for name, method in r.methods.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the full study, not --quick")
    parser.add_argument("--jobs", type=int, help="workers of the parallel run (default: bench's)")
    parser.add_argument("--config", type=Path, help="TOML config (default: built-in)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_toml(RunConfig, args.config)
    if not args.full:
        config, _ = quick(config)
    jobs = args.jobs or bench_jobs(config)
    load_or_pretrain(config.host)  # the host is shared, and not part of either time
    seconds, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / "serial", Path(tmp) / "parallel"]
        for n, out in zip((1, jobs), outs, strict=True):
            start = time.perf_counter()
            results.append(run_benchmark(config, out, quick=not args.full, jobs=n, progress=False))
            seconds.append(time.perf_counter() - start)
            print(f"jobs {n}: {seconds[-1]:.1f} s")
        same = comparable(results[0]) == comparable(results[1]) and same_outputs(*outs)
    study = "full" if args.full else "quick"
    count = len(config.methods) * config.seeds
    print(f"{study} study, {count} units, {len(config.tasks)} tasks each")
    units = unit_seconds(results[0])
    longest = max(units, key=units.get)
    total = sum(units.values())
    print(
        f"serial units: {total:.1f} s in all, the longest {units[longest]:.1f} s ({longest}); "
        f"no schedule of {jobs} jobs beats {max(units[longest], total / jobs):.1f} s"
    )
    print("serial unit seconds: " + ", ".join(f"{u} {t:.1f}" for u, t in units.items()))
    print(f"jobs={jobs}")
    print(f"jobs_speedup={seconds[0] / seconds[1]:.2f}")
    print(f"identical={same}")


if __name__ == "__main__":
    main()
