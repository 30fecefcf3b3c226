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
import importlib.util
import json
import os
import random
import re
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
    timed(world, "train_preflight", "check_seconds")
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


# --- the store against an Arrow table (Hugging Face datasets) -------------------------------


def resident() -> dict[str, float]:
    """RssAnon (private) and RssFile (mapped file pages: the shared page cache), in MiB."""
    fields = dict(line.split(":") for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}


def store_write(kind: str, folder: Path, paths: list[str]) -> dict[str, float]:
    """Write `paths`' random codes into a store of `kind` at `folder`."""
    start = time.perf_counter()
    if kind == "store":
        from modecl.hosts.token_cache import TokenStore

        TokenStore(folder).write(random_codes(paths))
    else:
        from datasets import Dataset, Features, Sequence, Value

        features = Features({"path": Value("string"), "codes": Sequence(Value("uint16"))})

        def rows() -> Iterator[dict[str, Any]]:
            for path, codes in random_codes(paths):
                yield {"path": path, "codes": codes}

        table = Dataset.from_generator(rows, features=features, cache_dir=str(folder / "cache"))
        table.save_to_disk(str(folder / "table"))
        del table
        shutil.rmtree(folder / "cache")
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"write_s": seconds, "bytes_per_image": size / len(paths)}


def store_read(kind: str, folder: Path, lookups: list[str]) -> dict[str, float]:
    """Open the store of `kind` at `folder` and look up `lookups` by path, in a process
    that did nothing else: the memory it gains is the store's."""
    if kind == "store":
        from modecl.hosts.token_cache import TokenStore
    else:
        from datasets import load_from_disk
    before, start = resident(), time.perf_counter()
    if kind == "store":
        store = TokenStore(folder)

        def find(path: str) -> np.ndarray:
            return store[path]
    else:
        table = load_from_disk(str(folder / "table")).with_format("numpy")
        row_of = {path: i for i, path in enumerate(table["path"])}  # a by-path index

        def find(path: str) -> np.ndarray:
            return table[row_of[path]]["codes"]

    out = {"open_s": time.perf_counter() - start}
    opened, start = resident(), time.perf_counter()
    for path in lookups:
        find(path)
    out["lookup_us"] = (time.perf_counter() - start) / len(lookups) * 1e6
    after = resident()
    out["open_private_mib"] = opened["RssAnon"] - before["RssAnon"]
    out["lookups_private_mib"] = after["RssAnon"] - opened["RssAnon"]
    out["lookups_file_mib"] = after["RssFile"] - before["RssFile"]
    return out


def stores_case(images: int, workdir: Path) -> dict[str, dict[str, float]]:
    """The token store and an Arrow table (datasets): written in one process, opened and
    read in another."""
    out = {}
    for kind in ("store", "datasets"):
        folder = workdir / f"{kind}{images}"
        shutil.rmtree(folder, ignore_errors=True)
        out[kind] = {}
        for phase in ("write", "read"):
            command = [sys.executable, __file__, "--store-side", kind, phase, str(folder)]
            done = subprocess.run(
                [*command, str(images)], env=_env(), capture_output=True, text=True
            )
            if done.returncode:
                raise SystemExit(f"{kind} failed:\n{done.stderr[-4000:]}")
            out[kind] |= json.loads(done.stdout.splitlines()[-1])
        shutil.rmtree(folder, ignore_errors=True)
    return out


# --- the sharded image tokenizer ------------------------------------------------------------


def tokenize_worker(folder: Path, out: Path) -> None:
    """Tokenize every PNG of ``folder/images`` with the tiny VQ of ``folder/host`` into the
    store ``out/image_tokens``; writes ``out/rank<R>.json``: the images this process
    tokenized and the seconds of the whole call (every process's rounds gathered)."""
    from accelerate import PartialState

    from modecl.hosts.tasks import ImageTokenizer
    from modecl.hosts.world import load_host

    state = PartialState(cpu=True)
    model, _ = load_host(str(folder / "host"), "float32", state.device)
    files = [(p, "") for p in sorted((folder / "images").glob("*.png"))]
    tokenizer = ImageTokenizer(model, 32, 16, progress=False, folder=out / "image_tokens")
    mine, original = [], tokenizer._tokenize

    def counted(names: list[str], where: dict[str, str]) -> dict[str, np.ndarray]:
        mine.extend(names)
        return original(names, where)

    tokenizer._tokenize = counted  # type: ignore[method-assign]
    start = time.perf_counter()
    tokenizer(files)
    tokenizer.commit()
    seconds = time.perf_counter() - start
    result = {"tokenized": mine, "seconds": seconds, "stored": len(tokenizer.store)}
    (out / f"rank{state.process_index}.json").write_text(json.dumps(result))


def tokenize_case(images: int, workdir: Path, processes: list[int]) -> dict[str, Any]:
    """Images/s of the sharded tokenizer with a tiny VQ (32x32 pixels, 256 codes)."""
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from tests.fixtures import write_host as write_tiny

    folder = workdir / "tokenize"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i:05d}.png")
    write_tiny("chameleon", folder / "host")
    out: dict[str, Any] = {"images": images, "runs": {}}
    for count in processes:
        probe = folder / f"out{count}"
        shutil.rmtree(probe, ignore_errors=True)
        probe.mkdir()
        command = [__file__, "--tokenize-worker", str(folder), str(probe)]
        done = subprocess.run(
            _launcher(count) + command, env=_env(), capture_output=True, text=True
        )
        if done.returncode:
            raise SystemExit(f"tokenizing failed:\n{done.stderr[-4000:]}")
        ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(count)]
        everything = [name for rank in ranks for name in rank["tokenized"]]
        out["runs"][count] = {
            "images_per_s": images / max(r["seconds"] for r in ranks),
            "tokenized": len(everything),
            "once_each": sorted(everything) == sorted(map(str, (folder / "images").glob("*.png"))),
            "stored": ranks[0]["stored"],
        }
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}


def _launcher(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
    ]


# --- the report -----------------------------------------------------------------------------


def _rank0(case: dict[str, Any], count: int) -> dict[str, Any]:
    return case["runs"][count]["ranks"][0]


def _most(case: dict[str, Any], count: int, when: str, kind: str) -> float:
    """The largest of every process's memory (`kind`) at `when`."""
    return max(rank[when][kind] for rank in case["runs"][count]["ranks"])


# The rows of the table: (measure, its value of a case under `count` processes).
RUN_ROWS = (
    ("records read and checked per s", lambda c, n: c["records"] / _rank0(c, n)["check_seconds"]),
    ("launch to first step, s", lambda c, n: _rank0(c, n)["first_step"] - c["runs"][n]["launch"]),
    (
        "RSS per process at first step, MiB",
        lambda c, n: _most(c, n, "memory_first_step", "rss_mib"),
    ),
    ("private (USS) at first step, MiB", lambda c, n: _most(c, n, "memory_first_step", "uss_mib")),
    ("RSS per process at the end, MiB", lambda c, n: _most(c, n, "memory_end", "rss_mib")),
    ("manifest, s", lambda c, n: _rank0(c, n)["manifest_seconds"]),
    ("step checkpoint, s", lambda c, n: _rank0(c, n)["checkpoint_seconds"]),
    ("step checkpoint, KiB", lambda c, n: _rank0(c, n)["checkpoint_bytes"] / 1024),
    (
        "evaluation samples per s",
        lambda c, n: _rank0(c, n)["measured"] / _rank0(c, n)["measure_seconds"],
    ),
)


def report(cases: list[dict[str, Any]], stores: dict, tokenizing: dict) -> str:
    """The measures side by side, each size a column, and the ratio of the last to the first."""
    rows: list[tuple[str, list[Any]]] = [
        (
            "training samples (records in all)",
            [f"{c['samples']:,} ({c['records']:,})" for c in cases],
        )
    ]
    for count in sorted(cases[0]["runs"]):
        for name, value in RUN_ROWS:
            rows.append((f"{name}, {count} process(es)", [value(c, count) for c in cases]))
    rows.append(("dry run, s", [c["dry_run_grouped_False"][0] for c in cases]))
    for grouped, how in ((False, "random order"), (True, "grouped by length")):
        padded = [_padding(c[f"dry_run_grouped_{grouped}"][1]) for c in cases]
        rows.append((f"padding, batch 8 in 1 process, {how}", padded))
    lines = ["| measure | " + " | ".join(f"{c['samples']:,}" for c in cases) + " | ratio |"]
    lines.append("|---|" + "---|" * (len(cases) + 1))
    for name, values in rows:
        numbers = all(isinstance(v, int | float) for v in values)
        ratio = f"{values[-1] / values[0]:.2f}" if numbers and values[0] else ""
        shown = [f"{v:,.1f}" if isinstance(v, float) else str(v) for v in values]
        lines.append(f"| {name} | {' | '.join(shown)} | {ratio} |")
    return "\n".join([*lines, "", stores_table(stores), "", tokenize_table(tokenizing)])


def _padding(table: str) -> str:
    """The total padding fraction of a dry run's table."""
    return re.findall(r"^\| total \|.* \| ([0-9.]+%) \|$", table, re.MULTILINE)[0]


STORE_ROWS = (
    ("write, s", "write_s", "{:.1f}"),
    ("bytes per image on disk", "bytes_per_image", "{:,.0f}"),
    ("open, s", "open_s", "{:.3f}"),
    ("lookup by path, us", "lookup_us", "{:.1f}"),
    ("private memory gained by opening, MiB", "open_private_mib", "{:.1f}"),
    ("private memory gained by the lookups, MiB", "lookups_private_mib", "{:.1f}"),
    ("page cache mapped by the lookups, MiB", "lookups_file_mib", "{:.1f}"),
)


def stores_table(stores: dict) -> str:
    lines = [
        f"{stores['images']:,} images x {PER_IMAGE} codes, 10,000 random lookups by path",
        "",
        "|  | token store | Arrow table (datasets) |",
        "|---|---|---|",
    ]
    for name, key, form in STORE_ROWS:
        ours, theirs = (form.format(stores[kind][key]) for kind in ("store", "datasets"))
        lines.append(f"| {name} | {ours} | {theirs} |")
    return "\n".join(lines)


def tokenize_table(tokenizing: dict) -> str:
    lines = [
        f"the sharded image tokenizer, tiny VQ (32x32 pixels, 256 codes), "
        f"{tokenizing['images']:,} images",
        "",
        "| processes | images per s | images tokenized (each once) |",
        "|---|---|---|",
    ]
    for count, r in tokenizing["runs"].items():
        once = "yes" if r["once_each"] else "NO"
        lines.append(f"| {count} | {r['images_per_s']:.1f} | {r['tokenized']:,} ({once}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[10_000, 270_000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--store-images", type=int, default=100_000, help="store vs datasets")
    parser.add_argument("--tokenize-images", type=int, default=1_000)
    parser.add_argument("--keep", type=Path, help="write the data here and keep it")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--store-side", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--tokenize-worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.argv)
        return
    if args.store_side is not None:
        kind, phase, folder, images = args.store_side
        paths = [f"coin/ImageNet/train/{i:07d}.jpg" for i in range(int(images))]
        if phase == "write":
            print(json.dumps(store_write(kind, Path(folder), paths)))
        else:
            lookups = random.Random(0).choices(paths, k=10_000)
            print(json.dumps(store_read(kind, Path(folder), lookups)))
        return
    if args.tokenize_worker is not None:
        tokenize_worker(*args.tokenize_worker)
        return
    if importlib.util.find_spec("datasets") is None:
        raise SystemExit("the store comparison needs datasets: pip install 'modecl[bench]'")
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="modecl-coin-scale-"))
    try:
        cases = [scale_case(n, workdir, args.processes) for n in args.samples]
        stores = {"images": args.store_images} | stores_case(args.store_images, workdir)
        tokenizing = tokenize_case(args.tokenize_images, workdir, args.processes)
        if args.keep is not None:
            measured = {"cases": cases, "stores": stores, "tokenizing": tokenizing}
            (workdir / "coin_scale.json").write_text(json.dumps(measured, indent=1))
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report(cases, stores, tokenizing))


if __name__ == "__main__":
    main()
