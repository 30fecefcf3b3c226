"""Make the digits hosts that ship with the package (`modecl.digits.shipped`).

Each host seed of the host config (default: the built-in one) is pre-trained from scratch
into a fresh temporary cache (the shipped hosts are ignored), gated on the test pool as
`modecl pretrain` gates it, and written with its manifest (command, package versions, CPU,
kernel path, gate scores, SHA-256 of every file) to OUT/seed<N>/, replacing what was there.
Single-threaded, as `make` runs everything:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ship_hosts.py [--seeds 0 1 2]
        [--config HOST.toml] [--out src/modecl/digits/hosts]

A host that fails its gate stops the script before anything of it is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import tempfile
from pathlib import Path

import torch

from modecl.core.config import load_toml
from modecl.digits.config import DigitsConfig
from modecl.digits.pretrain import cache_key, check_gate, load_or_pretrain
from modecl.digits.shipped import SHIPPED, ship


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="host seeds")
    parser.add_argument("--config", type=Path, help="host TOML (`modecl pretrain --config`)")
    parser.add_argument("--out", type=Path, default=SHIPPED, help="where the hosts go")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    how = ["--seeds", *map(str, args.seeds)] + (["--config", str(args.config)] * bool(args.config))
    command = shlex.join(["python", "benchmarks/ship_hosts.py", *how])  # how, not where
    base = load_toml(DigitsConfig, args.config)
    for seed in args.seeds:
        config = dataclasses.replace(base, seed=seed)
        with tempfile.TemporaryDirectory(prefix="modecl-ship-") as cache:
            host = load_or_pretrain(config, cache, use_shipped=False)
            captioning, generation = host.gate_scores()
            check_gate(config, captioning, generation)
            scores = {"captioning": captioning, "generation": generation}
            manifest = ship(
                host.folder,
                args.out / f"seed{seed}",
                key=cache_key(config),
                seed=seed,
                gate=scores,
                command=command,
            )
        shown = {k: v for k, v in manifest.items() if k != "files"}
        print(json.dumps(shown), flush=True)


if __name__ == "__main__":
    main()
