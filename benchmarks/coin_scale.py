"""The real path at CoIN's size: `modecl train` over the five tasks at their record counts.

Writes synthetic CoIN folders (ScienceQA multiple choice with options, TextVQA and VizWiz
with 10 annotator answers, ImageNet class names, GQA short answers) at CoIN's train / test
record counts scaled to `--samples` training samples, a token store pre-filled with random
codes for every image (no image files), and a tiny host with Anole's vocabulary layout
(65,536 ids, image codes at 4..8195, 1,024 codes per image, a context of 2,048). Then, under
1 and 2 processes (torchrun, gloo), runs `modecl train` (seq-lora, 2 steps of a global batch
of 2 on each task, a step checkpoint every step, 4 test samples a task) and prints:

- records read and checked per second (`check_inputs`, before the host loads);
- seconds from launch to the first step;
- RSS (and private memory, USS) per process at the first step and at the end;
- the manifest's seconds; a step checkpoint's seconds and bytes;
- evaluation samples per second on the test subset (the pre-trained host's stage);
- `modecl train --dry-run`'s seconds and the padding fraction of the training batches, at
  random order and grouped by length.

Then the token store against an Arrow table through Hugging Face `datasets` (the same codes:
write, bytes, open, lookups, memory), and the sharded image tokenizer's images/s with a tiny
VQ encoder at 1 and 2 processes. Run it on an otherwise idle machine for comparable numbers:

    .venv/bin/python benchmarks/coin_scale.py --samples 10000 270000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
# CoIN's five tasks of the paper: (train records, test records).
COIN = {
    "ScienceQA": (12_726, 4_241),
    "TextVQA": (34_602, 5_000),
    "ImageNet": (129_887, 5_050),
    "GQA": (72_140, 12_578),
    "VizWiz": (20_523, 4_319),
}
CODES, OFFSET, PER_IMAGE = 8192, 4, 1024  # Anole: ids 4..8195, a 32x32 grid
VOCAB = 65_536
IMAGE_SIZE = 512
MIB = 2**20
_WORDS = (
    "the a of in on to is what which color object image sign written person shirt left "
    "right table cup plate dog cat car tree house bottle book phone screen label brand "
    "number red blue green white black yellow small large two three yes no unanswerable "
    "mammal bird fish reptile plant rock metal wood glass water context question lecture "
    "answer with option letter from given choices directly single word phrase provided "
    "information insufficient respond using this that it are there how many kind where"
)
WORDS = _WORDS.split()
CLASSES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray"]
CONFIG = f"""
seed = 0
[host]
image_size = {IMAGE_SIZE}
[continual.adapter]
rank = 4
dropout = 0.0
[continual.train]
epochs = 1
batch_size = 2
max_train_samples = 4
checkpoint_every = 1
[continual.monitor]
enabled = false
[eval]
batch_size = 4
max_new_tokens = 2
max_test_samples = 4
draws = 0
"""


# What the dry run plans: the paper's schedule in one process (8 processes pad nothing).
PAPER = f"""
[host]
image_size = {IMAGE_SIZE}
[continual.train]
epochs = 1
batch_size = 8
group_by_length = {{grouped}}
"""


# --- the data ------------------------------------------------------------------------------


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))


def _sample(task: str, rng: random.Random) -> tuple[str, str, list[str] | None]:
    """(question, answer, the annotators' answers or None) in the task's style."""
    short = "\nAnswer the question using a single word or phrase."
    if task == "ScienceQA":
        options = [_words(rng, 1, 4) for _ in range(rng.randint(2, 5))]
        lines = [f"{chr(65 + k)}. {o}" for k, o in enumerate(options)]
        context = f"Context: {_words(rng, 0, 80)}\n" if rng.random() < 0.5 else ""
        question = f"{context}{_words(rng, 5, 15)}?\n" + "\n".join(lines)
        question += "\nAnswer with the option's letter from the given choices directly."
        return question, chr(65 + rng.randrange(len(options))), None
    if task == "ImageNet":
        return "What is the object in the image?" + short, rng.choice(CLASSES), None
    answer = _words(rng, 1, 2)
    question = f"{_words(rng, 4, 12)}?" + short
    if task == "VizWiz":
        question += " When the provided information is insufficient, respond with 'Unanswerable'."
    if task in ("TextVQA", "VizWiz"):
        return question, answer, [answer] * 7 + [_words(rng, 1, 2) for _ in range(3)]
    return question, answer, None


def write_coin(root: Path, samples: int) -> tuple[list[Path], list[str]]:
    """CoIN folders under ``root/Instructions`` at ``samples`` training records in all (the
    test records scaled alike); the task folders and every image path (under ``root``)."""
    scale = samples / sum(train for train, _ in COIN.values())
    rng, folders, images = random.Random(0), [], []
    for task, counts in COIN.items():
        folder = root / "Instructions" / task
        folder.mkdir(parents=True, exist_ok=True)
        for split, count in zip(("train", "test"), counts, strict=True):
            records = []
            for i in range(max(round(count * scale), 2)):
                image = f"{task}/{split}/{i:07d}.jpg"
                question, answer, answers = _sample(task, rng)
                if split == "train":
                    turns = [{"from": "human", "value": f"<image>\n{question}"}]
                    record = {"id": str(i), "image": image}
                    record["conversations"] = [*turns, {"from": "gpt", "value": answer}]
                else:
                    record = {"question_id": i, "image": image, "text": question}
                    record |= {"answer": answer} | ({"answers": answers} if answers else {})
                records.append(record)
                images.append(str(root / image))
            (folder / f"{split}.json").write_text(json.dumps(records))
        folders.append(folder)
    return folders, images


def write_host(folder: Path) -> Path:
    """A tiny Chameleon with Anole's vocabulary layout, and a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import (
        ChameleonConfig,
        ChameleonForConditionalGeneration,
        PreTrainedTokenizerFast,
    )

    mapping = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for code in range(CODES):  # as on the hub: IMGIMG + the code's digits as letters + Z
        mapping["IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(code)) + "Z"] = OFFSET + code
    mapping |= {"<eoss>": 8196, "<racm3:break>": 8197, "<image>": 8711}
    words = sorted({*WORDS, *" ".join(CLASSES).split(), *"?.,:'ABCDE", "Context", "What"})
    text = {w: 9000 + i for i, w in enumerate(words)}
    config = ChameleonConfig(
        vocab_size=VOCAB,
        vocabulary_map=mapping | text,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        vq_config={
            "embed_dim": 4,
            "num_embeddings": CODES,
            "latent_channels": 4,
            "base_channels": 32,
            "channel_multiplier": [1, 2],
        },
    )
    torch.manual_seed(0)
    ChameleonForConditionalGeneration(config).save_pretrained(folder)
    vocab = {k: v for k, v in mapping.items() if v < 4} | text
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(folder)
    return folder


def random_codes(paths: list[str], seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    for start in range(0, len(paths), 1000):
        block = rng.integers(0, CODES, (len(paths[start : start + 1000]), PER_IMAGE)) + OFFSET
        yield from zip(paths[start : start + 1000], block.astype(np.uint16), strict=True)


def fill_store(folder: Path, host: Path, paths: list[str]) -> float:
    """The out dir's token store, every image's codes random; the seconds it took."""
    from modecl.hosts.tasks import token_source
    from modecl.hosts.token_cache import TokenStore

    start = time.perf_counter()
    TokenStore(folder, source=token_source(str(host), IMAGE_SIZE)).write(random_codes(paths))
    return time.perf_counter() - start


# --- one `modecl train`, measured from inside ----------------------------------------------


def memory() -> dict[str, float]:
    info = psutil.Process().memory_full_info()
    return {"rss_mib": info.rss / MIB, "uss_mib": info.uss / MIB}


def worker(out: Path, argv: list[str]) -> None:
    """`modecl train argv` with probes; writes ``out/rank<R>.json``."""
    from modecl import cli
    from modecl.core import runner, train
    from modecl.hosts import world

    rank, found = int(os.environ.get("RANK", "0")), {}

    def timed(owner: Any, name: str, key: str, after: Any = None) -> None:
        original = getattr(owner, name)

        def probe(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            value = original(*args, **kwargs)
            found.setdefault(key, time.perf_counter() - start)
            if after is not None:
                after(args, value)
            return value

        setattr(owner, name, probe)

    def first_step(n: int, values: dict) -> None:
        if "first_step" not in found:
            found["first_step"] = time.time()
            found["memory_first_step"] = memory()

    def train_task(*args: Any, **kwargs: Any) -> Any:
        kwargs["on_step"] = first_step
        return original_train(*args, **kwargs)

    def measured(args: tuple, value: Any) -> None:
        found.setdefault("measured", sum(len(t.test) for t in args[2]))

    def saved(args: tuple, value: Any) -> None:
        folder = args[0].folder
        found.setdefault("checkpoint_bytes", sum(f.stat().st_size for f in folder.rglob("*")))

    original_train = runner.train_task
    runner.train_task = train_task
    timed(world, "check_inputs", "check_seconds")
    timed(runner, "measure", "measure_seconds", measured)
    timed(runner, "manifest", "manifest_seconds")
    timed(train.StepCheckpoint, "save", "checkpoint_seconds", saved)
    code = cli.main(argv)
    found |= {"code": code, "memory_end": memory()}
    (out / f"rank{rank}.json").write_text(json.dumps(found))


def launch(processes: int, argv: list[str], out: Path) -> dict[str, Any]:
    """Run `modecl train argv` in ``processes`` processes; what every rank measured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    command = [sys.executable, __file__, "--worker", str(out), "--", *argv]
    if processes > 1:
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*run, "--nproc_per_node", str(processes), *command[1:]]
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"modecl train failed:\n{done.stderr[-4000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    return {"launch": start, "ranks": ranks}


def dry_run(argv: list[str]) -> tuple[float, str]:
    """`modecl train --dry-run`: its seconds and its table."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "modecl.cli", *argv, "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"modecl train --dry-run failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - start, done.stdout


def scale_case(samples: int, workdir: Path, processes: list[int]) -> dict[str, Any]:
    """Every measure of one size."""
    root = workdir / f"coin{samples}"
    start = time.perf_counter()
    folders, images = write_coin(root, samples)
    host = write_host(root / "host")
    records = len(images)
    written = time.perf_counter() - start
    (root / "train.toml").write_text(CONFIG)
    out = {"samples": samples, "records": records, "write_seconds": written, "runs": {}}
    for count in processes:
        run_dir = root / f"out{count}"
        shutil.rmtree(run_dir, ignore_errors=True)
        out["store_seconds"] = fill_store(run_dir / "image_tokens", host, images)
        argv = ["train", "--model", str(host), "--tasks", *map(str, folders), "--methods"]
        argv += ["seq-lora", "--config", str(root / "train.toml"), "--out", str(run_dir)]
        argv += ["--image-root", str(root)]
        if count == processes[0]:  # the paper's schedule: every sample, a batch of 8
            for grouped in (False, True):
                paper = root / f"paper-{grouped}.toml"
                paper.write_text(PAPER.format(grouped=str(grouped).lower()))
                config = argv.index("--config") + 1
                plan = [*argv[:config], str(paper), *argv[config + 1 :], "--processes", "1"]
                out[f"dry_run_grouped_{grouped}"] = dry_run(plan)
        result = launch(count, argv, root / f"probe{count}")
        out["runs"][count] = result
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[10_000, 270_000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--keep", type=Path, help="write the data here and keep it")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.argv)
        return
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="modecl-coin-scale-"))
    try:
        cases = [scale_case(n, workdir, args.processes) for n in args.samples]
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(cases, indent=1))


if __name__ == "__main__":
    main()
