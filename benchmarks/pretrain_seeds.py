"""Pre-training time and competence gate of the digits host, per host seed, from an empty cache.

For each seed, the host config (default: the built-in one, which `configs/digits.toml`
documents) with `seed` set is pre-trained into a fresh temporary cache, so nothing is
loaded, then measured on the test pool as `modecl pretrain` does: captioning accuracy and
generation accuracy (`generation.samples_per_digit` draws per digit, judged). Printed per
seed: pre-training wall seconds (`load_or_pretrain`'s own figure), CPU seconds of the
process over the same span, the 1-minute load average before and after (the machine's
other work slows torch down), the selected epoch, both accuracies and whether the gate
passed. Run it single-threaded, as `make` does:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pretrain_seeds.py [--seeds 0 1 2]
        [--config HOST.toml] [--keep DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from modecl.core.config import load_toml
from modecl.digits.config import DigitsConfig
from modecl.digits.pretrain import GateError, check_gate, load_or_pretrain


def measure(config: DigitsConfig, cache: Path) -> dict:
    load_before = os.getloadavg()[0]
    cpu = time.process_time()
    host = load_or_pretrain(config, cache, progress=False)
    cpu = time.process_time() - cpu
    captioning, generation = host.gate_scores()
    try:
        check_gate(config, captioning, generation)
        passed = True
    except GateError:
        passed = False
    return {
        "seed": config.seed,
        "seconds": round(host.log["seconds"], 1),
        "cpu_seconds": round(cpu, 1),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "selected_epoch": host.log["selected_epoch"],
        "captioning": round(captioning, 4),
        "generation": round(generation, 4),
        "gate_passed": passed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="host seeds")
    parser.add_argument("--config", type=Path, help="host TOML (`modecl pretrain --config`)")
    parser.add_argument("--keep", type=Path, help="keep hosts in DIR/seed<N>")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base = load_toml(DigitsConfig, args.config)
    for seed in args.seeds:
        config = dataclasses.replace(base, seed=seed)
        kept = args.keep / f"seed{seed}" if args.keep else None
        if kept is not None and kept.exists() and any(kept.iterdir()):
            parser.error(f"{kept} is not empty: the host would be loaded, not pre-trained")
        cache = Path(tempfile.mkdtemp(prefix="modecl-pretrain-bench-"))
        try:
            row = measure(config, kept or cache)
        finally:
            shutil.rmtree(cache)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
