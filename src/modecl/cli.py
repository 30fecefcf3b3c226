"""The ``modecl`` command line.

Every error is one line ``modecl: error: ...``: bad input (arguments included) exits 2, a
failed unit or a write the system refused (a read-only or full disk) exits 1. Ctrl-C and
SIGTERM print where the run stopped and exit 130 and 143.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch
from safetensors.torch import load_file

from modecl.core.claims import claim_columns, claim_rows, tally
from modecl.core.config import ConfigError, load_toml, toml_keys
from modecl.core.export import ExportError, export_peft, stage_adapters
from modecl.core.report import headline_rows, write_report
from modecl.core.results import read_results
from modecl.core.tasks import TaskFileError
from modecl.core.train import PROGRESS
from modecl.core.workers import UnitFailed, threads_per_worker
from modecl.digits import shipped
from modecl.digits.bench import bench_jobs, run_benchmark
from modecl.digits.bench import quick as quick_config
from modecl.digits.config import DigitsConfig, RunConfig
from modecl.digits.pretrain import GateError, cache_key, check_gate, load_or_pretrain
from modecl.hosts.config import TrainConfig

CACHE_HELP = "cache dir (default: $MODECL_CACHE or ~/.cache/modecl)"


def _host_summary(config: DigitsConfig, cache_dir: Path | None, use_shipped: bool) -> dict:
    """Pre-train (or load) the digits host, measure it on the test pool, apply the gate."""
    start = time.perf_counter()
    host = load_or_pretrain(config, cache_dir, use_shipped=use_shipped)
    digits = host.digits
    captioning, generation = host.gate_scores()
    summary = {
        "judge": digits.judge_report(),
        "captioning_accuracy": captioning,
        "generation_accuracy": generation,
        "image_nll": digits.image_nll(host.model, digits.pools.test),
        "host_log": host.log,
        "seconds": time.perf_counter() - start,
    }
    return summary | {"host": host}


def _print_host(summary: dict, config: DigitsConfig) -> None:
    log = summary["host_log"]
    how = (
        f"loaded ({log['source']}) in {log['load_seconds']:.1f} s"
        if log["cached"]
        else f"pre-trained in {log['seconds']:.0f} s (epoch {log['selected_epoch']} selected)"
    )
    judge = summary["judge"]
    print(f"host model: {how}")
    print(
        f"judge accuracy on real test images {judge['real_accuracy']:.3f}, "
        f"on codebook reconstructions {judge['reconstructed_accuracy']:.3f}"
    )
    print(
        f"captioning accuracy {summary['captioning_accuracy']:.3f} "
        f"(gate {config.gate.captioning:.2f}), generation accuracy "
        f"{summary['generation_accuracy']:.3f} (gate {config.gate.generation:.2f}), "
        f"image-token NLL {summary['image_nll']:.3f}"
    )


def cmd_pretrain(args: argparse.Namespace) -> None:
    config = load_toml(DigitsConfig, args.config)
    ship = shipped.find(cache_key(config))  # a shipped host is re-created, then compared
    summary = _host_summary(config, args.cache, use_shipped=ship is None)
    _print_host(summary, config)
    if ship is not None:
        print(_compare_to_shipped(summary, ship))
    check_gate(config, summary["captioning_accuracy"], summary["generation_accuracy"])
    print(f"done in {summary['seconds']:.1f} s")


def _compare_to_shipped(summary: dict, folder: Path) -> str:
    """Whether a re-created host equals the shipped one of its config, and if not by how
    much (weights, gate scores) and on what (kernel paths)."""
    manifest = shipped.verify(folder)
    weights = load_file(folder / "model" / "model.safetensors")
    difference = shipped.weights_difference(weights, summary["host"].model.state_dict())
    if difference == 0:
        return f"matches the shipped host {folder} bit for bit"
    scores = manifest["gate_scores"]
    return (
        f"differs from the shipped host {folder}: largest weight difference {difference:.3g}; "
        f"captioning / generation {summary['captioning_accuracy']:.3f} / "
        f"{summary['generation_accuracy']:.3f} here, {scores['captioning']:.3f} / "
        f"{scores['generation']:.3f} shipped; kernel path "
        f"{torch.backends.cpu.get_cpu_capability()} here, {manifest['kernel_path']} shipped "
        f"({manifest['cpu']}). `modecl bench` uses the shipped host."
    )


def cmd_bench(args: argparse.Namespace) -> None:
    config = load_toml(RunConfig, args.config)
    if args.methods is not None:
        config.methods = parse_methods(args.methods)
    if args.seeds is not None:
        config.seeds = args.seeds
    if args.hosts is not None:
        config.hosts = args.hosts
    if args.quick:
        config, notes = quick_config(config, toml_keys(args.config))
        for note in notes:
            print(note)
    out = args.out or Path("runs/digits-quick" if args.quick else "runs/digits")
    results = run_benchmark(
        config,
        out,
        quick=args.quick,
        cache_dir=args.cache,
        config_file=args.config,
        jobs=bench_jobs(config, args.threads) if args.jobs is None else args.jobs,
    )
    report = write_report(out)
    print(
        f"{'QUICK run: ' if args.quick else ''}results in {out / 'results.json'}, report {report}"
    )
    print("\n".join(headline_rows(results)))
    print(f"done in {time.perf_counter() - args.start:.1f} s")


def parse_methods(text: str) -> list[str]:
    """``--methods a,b``: the names, stripped; empty entries and repeats are refused later."""
    return [m.strip() for m in text.split(",")] if text.strip() else []


def cmd_train(args: argparse.Namespace) -> None:
    # Imported here: the digits commands need neither accelerate's nor the hosts' machinery.
    from modecl.core.processes import Processes
    from modecl.hosts.world import default_accelerator, train_run

    if args.method and args.methods:
        raise ConfigError("give --method or --methods, not both")
    methods = parse_methods(args.methods) if args.methods is not None else [args.method or "mode"]
    config = load_toml(TrainConfig, args.config)
    where = (args.model, args.tasks, methods, args.out)
    given = {
        "kd_data": args.kd_data,
        "image_root": args.image_root,
        "concepts": args.concepts,
        "config": config,
        "seeds": args.seeds,
        "config_files": [args.config] if args.config else [],
    }
    if args.dry_run:
        from modecl.hosts.dry_run import dry_run

        count = args.processes or int(os.environ.get("WORLD_SIZE", "1"))
        print(dry_run(*where, processes=count, **given))
        return
    if args.processes is not None:
        raise ConfigError(
            "--processes is for --dry-run: a run has the processes it is launched with"
        )
    processes = Processes(default_accelerator())
    results = train_run(*where, processes=processes, **given)
    if processes.main:  # the one process that wrote the results
        report = write_report(args.out)
        print(f"results in {args.out / 'results.json'}, report {report}")
        print("\n".join(headline_rows(results)))
        print(f"done in {time.perf_counter() - args.start:.1f} s")


def cmd_eval(args: argparse.Namespace) -> None:
    from modecl.core.processes import Processes
    from modecl.hosts.stage_eval import eval_stage
    from modecl.hosts.world import default_accelerator

    processes = Processes(default_accelerator())
    result = eval_stage(
        args.run,
        args.tasks,
        args.kd_data,
        image_root=args.image_root,
        concepts=args.concepts,
        seed=args.seed,
        method=args.method,
        stage=args.stage,
        out_file=args.out,
        processes=processes,
    )
    if processes.main:
        where = f"seed {result['seed']}, {result['method']}, stage {result['stage']}"
        print(f"{args.run} ({where}):")
        print("| task | accuracy | constrained |\n|---|---|---|")
        for name, exact, closed in zip(
            result["tasks"],
            result["task_accuracy"],
            result["constrained_task_accuracy"],
            strict=True,
        ):
            print(f"| {name} | {exact:.3f} | {'–' if closed is None else f'{closed:.3f}'} |")
        if "image_nll" in result["measures"]:
            print(f"image-token NLL of the test pairs: {result['measures']['image_nll']:.3f}")
        print(f"written: {result['file']}")


def cmd_report(args: argparse.Namespace) -> None:
    print(f"report written: {write_report(args.dir)}")


def cmd_export(args: argparse.Namespace) -> None:
    adapters = stage_adapters(
        args.run, args.method, stage=args.stage, seed=args.seed, host=args.host
    )
    key = (
        json.loads((args.run / "run.json").read_text()) if (args.run / "run.json").exists() else {}
    )
    base = key.get("inputs", {}).get("model")
    try:
        written = export_peft(adapters, args.out, branch=args.branch, base_model=base)
    except ExportError as err:
        raise ConfigError(f"{adapters}: {err}") from None
    print(f"{adapters} -> {args.out} (peft LoRA, r {written['r']}, {written['target_modules']})")


def cmd_claims(args: argparse.Namespace) -> None:
    runs = {str(run): read_results(Path(run) / "results.json") for run in args.runs}
    if args.per_run:
        print("\n".join(claim_columns(runs)))
        return
    replicates = sum(len(r.per_seed) for r in runs.values())
    print(f"{replicates} replicates (a seed on a host) in {len(runs)} run(s):")
    print("\n".join(claim_rows(tally(list(runs.values())), replicates)))


def _positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """Argument errors in the one-line form of every other input error."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="modecl", description=__doc__)
    parser.add_argument(
        "--threads",
        type=_positive,
        default=threads_per_worker(),
        help="CPU threads for torch, in each worker of `bench --jobs` too (default: "
        "$OMP_NUM_THREADS, else 1: the tiny digits model runs as fast on one, and more "
        "threads than free cores slow it down many times over)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pre-train (or load) the digits host model and gate it")
    b = sub.add_parser("bench", help="the embedded digits benchmark")
    for command in (p, b):
        command.add_argument("--config", type=Path, help="TOML config (default: built-in)")
        command.add_argument("--cache", type=Path, help=CACHE_HELP)
    p.set_defaults(func=cmd_pretrain)
    b.add_argument("--methods", help="comma-separated method names (default: the config's)")
    b.add_argument("--out", type=Path, help="default: runs/digits (quick: runs/digits-quick)")
    b.add_argument("--quick", action="store_true", help="a smaller first-look configuration")
    b.add_argument(
        "--jobs",
        type=int,
        help="worker processes for the (seed, method) units; default: the usable cores "
        "(affinity mask, cgroup quota) over --threads, capped by memory; 1: one process",
    )
    b.add_argument(
        "--seeds", type=_positive, help="repeat the study over N seeds (default: config)"
    )
    b.add_argument(
        "--hosts",
        type=_positive,
        help="repeat it on N hosts, host seeds host.seed.. (default: config)",
    )
    b.set_defaults(func=cmd_bench)
    t = sub.add_parser(
        "train", help="continual training of a transformers host (Chameleon/Anole, Emu3)"
    )
    t.add_argument("--model", required=True, help="local directory or hub id (from_pretrained)")
    t.add_argument(
        "--tasks",
        type=Path,
        nargs="+",
        required=True,
        help="JSONL task files or CoIN task folders (train.json and test.json)",
    )
    t.add_argument(
        "--image-root",
        type=Path,
        help="where CoIN folders' image paths start (default: each folder's parent)",
    )
    t.add_argument("--method", help="one method name (default: mode)")
    t.add_argument("--methods", help="comma-separated method names, e.g. mode,seq-lora")
    t.add_argument("--seeds", type=_positive, default=1, help="repeat over N seeds (mean ± std)")
    t.add_argument("--out", type=Path, required=True, help="run directory (resumes if present)")
    t.add_argument("--kd-data", type=Path, help="JSONL (caption, image) pairs")
    t.add_argument(
        "--concepts",
        type=Path,
        help="JSONL concepts (prompts, reference image folder) to draw from after every task",
    )
    t.add_argument("--config", type=Path, help="TOML TrainConfig (default: built-in)")
    t.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything, then print per task the samples, steps, tokens and padding; "
        "no weights are loaded, nothing is written",
    )
    t.add_argument(
        "--processes",
        type=_positive,
        help="with --dry-run: the processes the run will have (default: this launch's)",
    )
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="score a saved stage of a modecl train run, without training")
    e.add_argument("run", type=Path, help="the run's out dir")
    e.add_argument("--tasks", type=Path, nargs="+", help="task files (default: the run's)")
    e.add_argument("--kd-data", type=Path, help="pairs file (default: the run's)")
    e.add_argument("--image-root", type=Path, help="where CoIN folders' image paths start")
    e.add_argument("--concepts", type=Path, help="concepts file (default: the run's)")
    e.add_argument("--seed", type=int, help="default: the run's first seed")
    e.add_argument("--method", help="default: the last method (alphabetical) of the run")
    e.add_argument("--stage", type=_positive, help="default: the last finished stage")
    e.add_argument("--out", type=Path, help="default: RUN/eval/seed<S>-<method>-stage<K>.json")
    e.set_defaults(func=cmd_eval)
    r = sub.add_parser("report", help="rebuild report.md and figures from a run's results")
    r.add_argument("dir", type=Path)
    r.set_defaults(func=cmd_report)
    x = sub.add_parser(
        "export", help="write a stage's LoRA-family adapters in peft's format (PeftModel)"
    )
    x.add_argument("run", type=Path, help="the run's out dir")
    x.add_argument("--method", required=True, help="a method of the run")
    x.add_argument("--stage", type=_positive, help="default: its last finished stage")
    x.add_argument("--seed", type=int, help="default: the run's last replicate")
    x.add_argument("--host", type=int, help="the host seed, in a run over several hosts")
    x.add_argument(
        "--branch",
        choices=("shared", "text", "image"),
        help="default: the kind's first that exports",
    )
    x.add_argument("--out", type=Path, required=True, help="the peft adapter folder to write")
    x.set_defaults(func=cmd_export)
    c = sub.add_parser(
        "claims", help="check the study's findings on every replicate of one or more runs"
    )
    c.add_argument("runs", type=Path, nargs="+", help="out dirs of runs (their results.json)")
    c.add_argument(
        "--per-run", action="store_true", help="one column per run instead of their union"
    )
    c.set_defaults(func=cmd_claims)
    return parser


# A write the system refused: one line naming the file, not a traceback.
WRITE_FAULTS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, to end it as Ctrl-C does."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.start = time.perf_counter()
        torch.set_num_threads(args.threads)
        args.func(args)
    except (ConfigError, GateError, TaskFileError, shipped.ShippedHostError) as exc:
        print(f"modecl: error: {exc}", file=sys.stderr)
        return 2
    except UnitFailed as exc:
        print(f"modecl: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in WRITE_FAULTS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"modecl: error: {where}{exc.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        if os.environ.get("RANK", "0") == "0":  # one line for a launch of several processes
            print(f"modecl: {PROGRESS.interrupted()}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
