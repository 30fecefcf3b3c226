"""The real path at scale: samples as views into the token store, a killed tokenization
resumed, length-grouped batches, and `modecl train --dry-run` (README, "CoIN's size")."""

from __future__ import annotations

import mmap
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from modecl.cli import main
from modecl.core.adapters import adapter_state_dict, attach_adapters
from modecl.core.config import ContinualSettings, from_dict, load_toml
from modecl.core.methods import get_method
from modecl.core.sequences import understand
from modecl.core.tasks import Samples
from modecl.core.train import epoch_order, padding, train_task
from modecl.digits.model import build_model
from modecl.hosts.config import TrainConfig
from modecl.hosts.tasks import ImageTokenizer
from modecl.hosts.token_cache import TOKEN_STORE
from modecl.hosts.world import InputFiles, host_world, load_host
from tests.conftest import tiny_config
from tests.fixtures import HOSTS, TRAIN_CONFIG, write_host, write_tasks


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    files, pairs = write_tasks(root / "data")
    (root / "train.toml").write_text(TRAIN_CONFIG)
    hosts = {family: write_host(family, root / family) for family in ("chameleon", "emu3")}
    return {"root": root, "files": files, "pairs": pairs, "hosts": hosts}


def mapped(codes: np.ndarray) -> bool:
    """Whether `codes` is a view into a memory-mapped file."""
    base = codes
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


def chameleon_world(inputs, token_cache, pairs=None):
    """The tiny Chameleon's world of the task files (and ``pairs``), and its image reader."""
    path = str(inputs["hosts"]["chameleon"])
    model, tokenizer = load_host(path, "float32", torch.device("cpu"))
    return host_world(
        model,
        tokenizer,
        model_path=path,
        config=load_toml(TrainConfig, inputs["root"] / "train.toml"),
        files=InputFiles.of(inputs["files"], pairs),
        names=[f.stem for f in inputs["files"]],
        token_cache=token_cache,
        progress=False,
    )


def test_loaded_samples_hold_views_of_the_token_store_not_tuples(inputs, tmp_path):
    world, images = chameleon_world(inputs, tmp_path / TOKEN_STORE, inputs["pairs"])
    images.commit()
    for task in world.tasks():
        assert isinstance(task.train, Samples) and isinstance(task.test, Samples)
        for sample in [*task.train, *task.test]:
            assert type(sample.codes) is np.ndarray and sample.codes.dtype == np.uint16
            assert mapped(sample.codes) and not sample.codes.flags.writeable
    for pair in [*world.pairs.train, *world.pairs.test]:
        assert type(pair.codes) is np.ndarray and mapped(pair.codes)


class Killed(BaseException):
    """A kill: nothing after it runs."""


def ints(rows) -> list[list[int]]:
    return [row.tolist() for row in rows]


def test_a_killed_tokenization_resumes_without_redoing_finished_segments(
    inputs, tmp_path, monkeypatch
):
    model = HOSTS["chameleon"]()
    files = [(f, "") for f in sorted((inputs["root"] / "data" / "images").glob("*.png"))]
    tokenized, original, armed = [], ImageTokenizer._tokenize, [True]

    def killed_in_round_four(self, names, where):
        if armed and len(tokenized) == 6:  # three rounds of 2: a segment of 4 written, 2 not
            armed.clear()
            raise Killed
        tokenized.extend(names)
        return original(self, names, where)

    monkeypatch.setattr(ImageTokenizer, "_tokenize", killed_in_round_four)
    folder = tmp_path / TOKEN_STORE

    def tokenizer() -> ImageTokenizer:
        return ImageTokenizer(model, 8, 2, progress=False, folder=folder, segment_images=4)

    with pytest.raises(Killed):
        tokenizer()(files)
    tokenized.clear()
    again = tokenizer()
    rows = again(files)
    assert sorted(tokenized) == sorted(str(f) for f, _ in files[4:])  # the rest only
    assert not folder.exists()  # staged until committed
    again.commit()
    assert ints(rows) == ints(ImageTokenizer(model, 8, progress=False)(files))
    assert len(again.store) == 12 and not again.staged.folder.exists()


def test_length_grouped_batches_pad_less_and_draw_the_same_permutation():
    lengths = np.random.default_rng(0).integers(1030, 1300, 1000)
    grouped = epoch_order(np.random.default_rng(3), lengths, 8, grouped=True)
    assert grouped.tolist() == epoch_order(np.random.default_rng(3), lengths, 8, True).tolist()
    plain = epoch_order(np.random.default_rng(3), lengths, 8, grouped=False)
    for start in range(0, 1000, 400):  # runs of 50 batches: the same samples, longest first
        run = grouped[start : start + 400]
        assert set(run.tolist()) == set(plain[start : start + 400].tolist())
        assert (np.diff(lengths[run]) <= 0).all()
    pads = [padding(lengths, order, 8, 1, 125) for order in (plain, grouped)]
    assert pads[0][0] / pads[0][1] > 0.05 and pads[1][0] / pads[1][1] < 0.005


def test_length_grouped_training_resumes_from_a_step_checkpoint(digits, tmp_path):
    settings = from_dict(
        ContinualSettings,
        {
            "adapter": {"rank": 2},
            "train": {"epochs": 2, "batch_size": 4, "max_train_samples": 16},
        },
    )
    settings.train.checkpoint_every, settings.train.group_by_length = 3, True
    task = digits.tasks(["parity"])[0]
    longer = [replace(s, question=s.question + " yes" * (i % 4)) for i, s in enumerate(task.train)]
    task = replace(task, train=longer)

    def trained(folder, kill_at=None):
        model = build_model(digits.vocab, tiny_config().model, seed=0)
        method = get_method("seq-lora")
        attach_adapters(model, method.adapter_config(settings))

        def step(n, values):
            if n == kill_at:
                raise Killed

        train_task(
            model, digits.format, method, task, settings, progress=False, checkpoint=folder,
            on_step=step,
        )  # fmt: skip
        return adapter_state_dict(model)

    whole = trained(tmp_path / "whole")
    with pytest.raises(Killed):
        trained(tmp_path / "resumed", kill_at=5)
    resumed = trained(tmp_path / "resumed")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def dry_run_argv(inputs, family: str, out) -> list[str]:
    argv = ["train", "--model", str(inputs["hosts"][family])]
    argv += ["--tasks", *map(str, inputs["files"]), "--methods", "mode,seq-lora"]
    argv += ["--kd-data", str(inputs["pairs"])]
    return [*argv, "--config", str(inputs["root"] / "train.toml"), "--out", str(out), "--dry-run"]


def test_dry_run_prints_the_plan_without_loading_weights(inputs, tmp_path, capsys, monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("a dry run loads no weights")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", refused)
    out = tmp_path / "out"
    assert main([*dry_run_argv(inputs, "chameleon", out), "--processes", "2"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()  # nothing written
    monkeypatch.undo()
    # The same tokens as the tasks the run loads (4 epochs of 8 samples, batches of 4).
    world, _ = chameleon_world(inputs, tmp_path / "t")
    rows = dict(re.findall(r"^\| (\w+) \| (.*) \|$", printed, re.MULTILINE))
    for task in world.tasks():
        tokens = sum(len(understand(world.format, s).input_ids) for s in task.train) * 4
        assert rows[task.name].split(" | ")[:4] == ["8", "4", "8", f"{tokens:,}"]
    assert rows["total"].split(" | ")[:3] == ["16", "8", "16"]
    assert "2 method(s) x 1 seed(s), 2 process(es)" in printed
    assert "32 optimizer steps per process" in printed


def test_dry_run_of_emu3_needs_its_tokens(inputs, tmp_path, capsys):
    assert main(dry_run_argv(inputs, "emu3", tmp_path / "out")) == 2
    assert "run once to tokenize the images" in capsys.readouterr().err


def test_dry_run_refuses_more_processes_than_a_batch_has_samples(inputs, tmp_path, capsys):
    argv = dry_run_argv(inputs, "chameleon", tmp_path / "out")
    assert main([*argv, "--processes", "5"]) == 2  # batches of 4
    assert "5 processes need a batch of at least 5 samples" in capsys.readouterr().err
    assert main([*argv[:-1], "--processes", "2"]) == 2  # a run has its launch's processes
    assert "--processes is for --dry-run" in capsys.readouterr().err
