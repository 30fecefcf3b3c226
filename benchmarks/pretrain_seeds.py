"""Pre-training time and competence gate of the digits host, per host seed and CPU kernel path.

For each (seed, kernel path), the host config (default: the built-in one, which
`configs/digits.toml` documents) with `seed` set is pre-trained into a fresh temporary
cache, so nothing is loaded, then measured on the test pool as `modecl pretrain` does:
captioning accuracy and generation accuracy (`generation.samples_per_digit` draws per digit,
judged). Each cell runs in its own process with `ATEN_CPU_CAPABILITY` set to the path
(`native`: unset, torch's choice for this CPU), since torch reads it once at start-up.
Printed per cell, one JSON line each, then a table: pre-training wall seconds
(`load_or_pretrain`'s own figure), CPU seconds, the 1-minute load average before and after
(the machine's other work slows torch down), the kernel path torch reports, the selected
epoch, both accuracies, their margins over the gate and whether the gate passed. Run it
single-threaded, as `make` does:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pretrain_seeds.py [--seeds 0 1 2]
        [--capabilities default,avx2,native] [--jobs 2] [--config HOST.toml] [--keep DIR]

`--jobs 2` runs two cells side by side (faster, but each cell's time is then a busy
machine's); `--keep DIR` keeps each host in DIR/<path>/seed<N>.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from modecl.core.config import load_toml
from modecl.digits.config import DigitsConfig
from modecl.digits.pretrain import GateError, check_gate, load_or_pretrain

NATIVE = "native"


def measure(config: DigitsConfig, cache: Path) -> dict:
    load_before = os.getloadavg()[0]
    cpu = time.process_time()
    host = load_or_pretrain(config, cache, progress=False, use_shipped=False)
    cpu = time.process_time() - cpu
    captioning, generation = host.gate_scores()
    try:
        check_gate(config, captioning, generation)
        passed = True
    except GateError:
        passed = False
    return {
        "seed": config.seed,
        "kernel_path": torch.backends.cpu.get_cpu_capability(),
        "seconds": round(host.log["seconds"], 1),
        "cpu_seconds": round(cpu, 1),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "selected_epoch": host.log["selected_epoch"],
        "captioning": round(captioning, 4),
        "generation": round(generation, 4),
        "captioning_margin": round(captioning - config.gate.captioning, 4),
        "generation_margin": round(generation - config.gate.generation, 4),
        "gate_passed": passed,
    }


def cell(config: Path | None, seed: int, capability: str, keep: Path | None) -> dict:
    """One (seed, kernel path) in a child process with ATEN_CPU_CAPABILITY set."""
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability != NATIVE:
        env["ATEN_CPU_CAPABILITY"] = capability
    command = [sys.executable, __file__, "--seeds", str(seed), "--cell"]
    if config is not None:
        command += ["--config", str(config)]
    if keep is not None:
        command += ["--keep", str(keep / capability)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"seed {seed}, path {capability} failed:\n{done.stderr}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return {"capability": capability, **row}


def table(rows: list[dict]) -> str:
    lines = [
        "| seed | kernel path | seconds | test captioning | test generation | margins | gate |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['capability']} ({r['kernel_path']}) | {r['seconds']:.1f} "
            f"| {r['captioning']:.3f} | {r['generation']:.3f} "
            f"| {r['captioning_margin']:+.3f} / {r['generation_margin']:+.3f} "
            f"| {'passes' if r['gate_passed'] else 'fails'} |"
        )
    worst = min(min(r["captioning_margin"], r["generation_margin"]) for r in rows)
    lines.append(f"smallest margin over the gate: {worst:+.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="host seeds")
    parser.add_argument(
        "--capabilities",
        default=NATIVE,
        help="comma-separated kernel paths (ATEN_CPU_CAPABILITY values, or native)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="cells side by side")
    parser.add_argument("--config", type=Path, help="host TOML (`modecl pretrain --config`)")
    parser.add_argument("--keep", type=Path, help="keep hosts in DIR/<path>/seed<N>")
    parser.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:  # one child: this process's kernel path is the one to measure
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        (seed,) = args.seeds
        config = dataclasses.replace(load_toml(DigitsConfig, args.config), seed=seed)
        kept = args.keep / f"seed{seed}" if args.keep else None
        if kept is not None and kept.exists() and any(kept.iterdir()):
            parser.error(f"{kept} is not empty: the host would be loaded, not pre-trained")
        cache = Path(tempfile.mkdtemp(prefix="modecl-pretrain-bench-"))
        try:
            print(json.dumps(measure(config, kept or cache)), flush=True)
        finally:
            shutil.rmtree(cache)
        return
    cells = [(s, c) for c in args.capabilities.split(",") for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(cell, args.config, s, c, args.keep) for s, c in cells]
        rows = []
        for future in futures:
            rows.append(future.result())
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
