"""`modecl train --dry-run`: what a run will do, before it takes any GPU.

Every check of `modecl train` that needs no model runs (the task files and folders read
and counted, the out dir's run key), then the host's config and tokenizer are read (not its
weights) and each task's samples are counted in tokens: an image's codes from the out dir's
token store where it was tokenized, else from the config (a Chameleon / Anole image is a
square grid of the VQ's downsampled size). The table gives, per task, the samples, the
optimizer steps each process takes, the training tokens and the padding fraction of the
first epoch's batches (each process pads its share of a batch to its longest, as the
training loop does), and the run's totals.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from modecl.core.config import ConfigError
from modecl.core.tasks import Samples
from modecl.core.train import epoch_order, padding, steps_per_epoch
from modecl.hosts.config import TrainConfig
from modecl.hosts.tasks import HostFormat, TaskTable
from modecl.hosts.token_cache import TOKEN_STORE, TokenStore
from modecl.hosts.world import train_preflight

__all__ = ["dry_run"]

SPLITS = ("train", "test")


class _Counts(Sequence[np.ndarray]):
    """Images known by their number of codes only (:meth:`HostFormat.lengths` reads no more)."""

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = counts

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, i: Any) -> np.ndarray:
        raise TypeError("a dry run reads no image codes")

    def lengths(self) -> np.ndarray:
        return self.counts


def chameleon_codes(host: Any, model_path: str, image_size: Any) -> int:
    """The codes of one image of a Chameleon / Anole host: its VQ halves the side once per
    level after the first; the side is ``host.image_size`` or the processor's crop."""
    if image_size is None:
        try:
            crop = AutoImageProcessor.from_pretrained(model_path).crop_size
        except (OSError, ValueError) as err:
            raise ConfigError(f"no image processor at {model_path} ({err})") from None
        image_size = (crop["height"], crop["width"])
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    factor = 2 ** (len(host.vq_config.channel_multiplier) - 1)
    return (height // factor) * (width // factor)


def _samples(
    table: TaskTable, split: str, fmt: HostFormat, store: TokenStore, per_image: int | None
) -> Samples:
    """One split of a task as a table whose codes are counted (stored, else `per_image`)
    or, for an Emu3 host, read from the store."""
    stored, found = store.rows(table.images[split])
    if fmt.vocab.family == "emu3" or per_image is None:
        if not found.all():
            missing = table.images[split][int(np.flatnonzero(~found)[0])]
            raise ConfigError(
                f"a dry run counts an Emu3 image's tokens from the token store, and {missing} "
                "is not in it: run once to tokenize the images"
            )
        codes: Sequence[np.ndarray] = stored
    else:
        codes = _Counts(np.where(found, stored.lengths(), per_image))
    return Samples(codes, table.fields[split])


def dry_run(
    model_path: str,
    task_files: Sequence[str | Path],
    methods: list[str],
    out: Path,
    *,
    kd_data: Path | None = None,
    image_root: Path | None = None,
    concepts: Path | None = None,
    config: TrainConfig | None = None,
    seeds: int = 1,
    config_files: Sequence[Path] = (),
    processes: int = 1,
) -> str:
    """The table of what `modecl train` with these arguments (as :func:`train_run`'s) will
    do under `processes` processes (module doc); raises as the run would on bad input."""
    config = config or TrainConfig()
    start = time.perf_counter()
    inputs = train_preflight(
        model_path,
        task_files,
        methods,
        out,
        kd_data=kd_data,
        image_root=image_root,
        concepts=concepts,
        config=config,
        seeds=seeds,
        config_files=config_files,
        tables=True,
    )
    records = sum(len(t.images[s]) for t in inputs.tables.values() for s in ("train", "test"))
    read = time.perf_counter() - start
    try:
        host = AutoConfig.from_pretrained(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        fmt = HostFormat.from_model(SimpleNamespace(config=host), tokenizer)
    except (OSError, ValueError, KeyError) as err:
        message = f"cannot read a host config and tokenizer from {model_path}: {err}"
        raise ConfigError(message) from None
    per_image = None
    if fmt.vocab.family == "chameleon":
        per_image = chameleon_codes(host, model_path, config.host.image_size)
    store = TokenStore(Path(out) / TOKEN_STORE)
    limit = getattr(host.get_text_config(), "max_position_embeddings", None)
    train = config.continual.train
    lines = [
        f"modecl train --dry-run: {len(inputs.files.tasks)} task files and folders, "
        f"{records:,} samples read and checked in {read:.1f} s",
        f"host: {fmt.vocab.family}, read from its config (no weights): "
        f"{getattr(host.get_text_config(), 'vocab_size', '?'):,} ids, context {limit}; "
        f"{len(store):,} images in the token store"
        + (f" ({per_image:,} codes for any other image, by the config)" if per_image else ""),
        f"run: {len(methods)} method(s) x {seeds} seed(s), {processes} process(es), global "
        f"batch {train.batch_size}, {train.epochs} epoch(s), batches "
        + ("grouped by length" if train.group_by_length else "in random order"),
        "",
        "| task | train samples | test samples | steps / process | training tokens | padding |",
        "|---|---|---|---|---|---|",
    ]
    totals = np.zeros(6, dtype=np.int64)  # the columns, then the batch tokens
    for k, name in enumerate(inputs.names):
        tables = [_samples(inputs.tables[name], s, fmt, store, per_image) for s in SPLITS]
        row = _plan(name, k, tables, fmt, config, processes, limit)
        totals += row
        lines.append(_line(name, row))
    lines.append(_line("total", totals.tolist()))
    runs = len(methods) * seeds
    lines += [
        "",
        f"the run: {runs} x the total ({len(methods)} method(s) x {seeds} seed(s)): "
        f"{runs * int(totals[2]):,} optimizer steps per process, "
        f"{runs * int(totals[3]):,} training tokens",
    ]
    return "\n".join(lines)


def _plan(
    name: str,
    k: int,
    tables: list[Samples],
    fmt: HostFormat,
    config: TrainConfig,
    processes: int,
    limit: int | None,
) -> list[int]:
    """Task `k`'s row: train and test samples, steps per process, training tokens, the
    first epoch's padding and batch tokens (its order as the first seed's run draws it)."""
    lengths = [fmt.lengths(table) for table in tables]
    for table, counted in zip(tables, lengths, strict=True):
        _check_context(table, counted, limit)
    train = config.continual.train
    rng = np.random.default_rng(config.seed * 1000 + k)  # as train_task's
    used = lengths[0]
    if train.max_train_samples is not None:
        used = used[rng.permutation(len(used))[: train.max_train_samples]]
    if processes > min(train.batch_size, len(used)):
        raise ConfigError(
            f"{processes} processes need a batch of at least {processes} samples "
            f"(train.batch_size {train.batch_size}, {len(used)} samples in '{name}')"
        )
    per_epoch = steps_per_epoch(len(used), train.batch_size, processes)
    order = epoch_order(rng, used, train.batch_size, train.group_by_length)
    pad, batch_tokens = padding(used, order, train.batch_size, processes, per_epoch)
    tests = min(len(tables[1]), config.eval.max_test_samples or len(tables[1]))
    return [
        len(used),
        tests,
        per_epoch * train.epochs,
        int(used.sum()) * train.epochs,
        pad,
        batch_tokens,
    ]


def _check_context(samples: Samples, lengths: np.ndarray, limit: int | None) -> None:
    """Refuse, as the run would, a sample longer than the host's context."""
    over = np.flatnonzero(lengths > limit) if limit is not None else []
    if len(over):
        where = samples.columns["source"][int(over[0])]
        raise ConfigError(
            f"{where}: the image, question and answer take {lengths[over[0]]} "
            f"tokens, more than the host's context of {limit} (max_position_embeddings)"
        )


def _line(name: str, row: list[int]) -> str:
    """A table row: samples, tests, steps, tokens; the padding's share of batch tokens."""
    samples, tests, steps, tokens, pad, batch_tokens = row
    share = f"{100 * pad / batch_tokens:.1f}%" if batch_tokens else "–"
    return f"| {name} | {samples:,} | {tests:,} | {steps:,} | {tokens:,} | {share} |"
