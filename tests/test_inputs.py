"""Bad input gets one clear error before any work; outputs are complete, readable, cleaned up.

The table drives the command line as a user would: each case exits 2 with a message that
names the file and the line / record / field, or the key, and leaves the out dir (and the
host cache) untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import Emu3ImageProcessor

from modecl.cli import main
from modecl.core.config import ConfigError, from_dict, load_toml
from modecl.core.files import TEMP_MARK, read_image, write_atomic
from modecl.core.results import read_results
from modecl.core.tasks import TaskFileError, read_jsonl
from modecl.digits.config import RunConfig
from modecl.hosts.config import TrainConfig
from modecl.hosts.tasks import read_token_cache
from tests.fixtures import HOSTS, TRAIN_CONFIG, tokenizer, write_host, write_tasks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    files, pairs = write_tasks(root / "data")
    host = write_host("chameleon", root / "host")
    config = root / "train.toml"
    config.write_text(TRAIN_CONFIG)
    return {"root": root, "files": files, "pairs": pairs, "host": host, "config": config}


def train_argv(data, out, *, tasks=None, pairs=None, config=None, model=None, extra=()):
    argv = ["train", "--model", str(model or data["host"]), "--tasks"]
    argv += [str(f) for f in (tasks or data["files"])]
    argv += ["--methods", "mode", "--kd-data", str(pairs or data["pairs"])]
    return [*argv, "--config", str(config or data["config"]), "--out", str(out), *extra]


def bench_argv(tmp_path, out, *extra):
    return ["bench", "--out", str(out), "--cache", str(tmp_path / "cache"), *extra]


def written(tmp_path: Path, name: str, content: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def bad_line(data, tmp_path, name, line: bytes) -> Path:
    """A copy of the color task with one line replaced."""
    lines = data["files"][0].read_bytes().splitlines(keepends=True)
    lines[2] = line + b"\n"
    task = written(data["root"] / "data", name, b"".join(lines))  # beside the images
    return task


def toml(tmp_path, text: str) -> Path:
    return written(tmp_path, "bad.toml", text)


# (name, argv builder (data, tmp_path, out) -> argv, message regex)
CASES = [
    (
        "task file not UTF-8",
        lambda d, t, o: train_argv(
            d, o, tasks=[bad_line(d, t, "latin.jsonl", b'{"q": "caf\xe9"}')]
        ),
        r"latin\.jsonl:3: not UTF-8 text",
    ),
    (
        "pairs file not UTF-8",
        lambda d, t, o: train_argv(d, o, pairs=written(t, "pairs.jsonl", b"\xff\xfe{}\n")),
        r"pairs\.jsonl:1: not UTF-8 text",
    ),
    (
        "config not UTF-8",
        lambda d, t, o: train_argv(d, o, config=written(t, "c.toml", b"seed = 0 # \xff\n")),
        r"c\.toml:1: not UTF-8 text",
    ),
    (
        "deeply nested JSON",
        lambda d, t, o: train_argv(
            d, o, tasks=[bad_line(d, t, "deep.jsonl", b"[" * 100000 + b"]" * 100000)]
        ),
        r"deep\.jsonl:3: JSON nested too deeply",
    ),
    (
        "config path is a directory",
        lambda d, t, o: train_argv(d, o, config=t),
        r": is a directory, expected a file",
    ),
    (
        "task file is a directory",
        lambda d, t, o: train_argv(d, o, tasks=[t]),
        r": file not found|is a directory",
    ),
    (
        "--out is an existing file",
        lambda d, t, o: train_argv(d, written(t, "taken", "x")),
        r"--out .*taken: is a file",
    ),
    (
        "--model is a file",
        lambda d, t, o: train_argv(d, o, model=d["files"][0]),
        r"--model .*color\.jsonl: is a file",
    ),
    (
        "a question of 2 MB",
        lambda d, t, o: train_argv(
            d,
            o,
            tasks=[bad_line(d, t, "huge.jsonl", json.dumps({"question": "a" * 2**21}).encode())],
        ),
        r"huge\.jsonl:3: a line of \d+ bytes, over the limit",
    ),
    (
        "epochs = 0",
        lambda d, t, o: train_argv(d, o, config=toml(t, "[continual.train]\nepochs = 0\n")),
        r"bad\.toml: continual\.train\.epochs: 0 is out of range \(allowed: >= 1\)",
    ),
    (
        "epochs = -1",
        lambda d, t, o: train_argv(d, o, config=toml(t, "[continual.train]\nepochs = -1\n")),
        r"continual\.train\.epochs: -1 is out of range",
    ),
    (
        "max_test_samples = 0",
        lambda d, t, o: train_argv(d, o, config=toml(t, "[eval]\nmax_test_samples = 0\n")),
        r"eval\.max_test_samples: 0 is out of range",
    ),
    (
        "negative max_train_samples",
        lambda d, t, o: train_argv(
            d, o, config=toml(t, "[continual.train]\nmax_train_samples = -5\n")
        ),
        r"continual\.train\.max_train_samples: -5 is out of range",
    ),
    (
        "batch_size = 0",
        lambda d, t, o: train_argv(d, o, config=toml(t, "[continual.train]\nbatch_size = 0\n")),
        r"continual\.train\.batch_size: 0 is out of range",
    ),
    (
        "rank = 0",
        lambda d, t, o: train_argv(d, o, config=toml(t, "[continual.adapter]\nrank = 0\n")),
        r"continual\.adapter\.rank: 0 is out of range",
    ),
    (
        "distillation top_k = 0",
        lambda d, t, o: train_argv(d, o, config=toml(t, "[continual.distill]\ntop_k = 0\n")),
        r"continual\.distill\.top_k: 0 is out of range",
    ),
    (
        "negative lr",
        lambda d, t, o: train_argv(d, o, config=toml(t, "[continual.train]\nlr = -0.1\n")),
        r"continual\.train\.lr: -0\.1 is out of range \(allowed: > 0\)",
    ),
    (
        "lr = nan",
        lambda d, t, o: train_argv(d, o, config=toml(t, "[continual.train]\nlr = nan\n")),
        r"continual\.train\.lr: nan is out of range",
    ),
    (
        "dropout = 1",
        lambda d, t, o: train_argv(d, o, config=toml(t, "[continual.adapter]\ndropout = 1.0\n")),
        r"continual\.adapter\.dropout: 1\.0 is out of range \(allowed: >= 0 and < 1\)",
    ),
    (
        "a pre-training fraction above 1",
        lambda d, t, o: bench_argv(
            t, o, "--config", str(toml(t, "[host.data]\ntrain_fraction = 1.5\n"))
        ),
        r"host\.data\.train_fraction: 1\.5 is out of range",
    ),
    (
        "--methods repeats",
        lambda d, t, o: bench_argv(t, o, "--methods", "seq-lora,seq-lora"),
        r"methods repeat: \['seq-lora', 'seq-lora'\]",
    ),
    (
        "--methods empty",
        lambda d, t, o: bench_argv(t, o, "--methods", ""),
        r"at least one method",
    ),
    (
        "train --methods repeats",
        lambda d, t, o: train_argv(d, o, extra=("--methods", "mode,mode")),
        r"methods repeat",
    ),
]


@pytest.mark.parametrize(("name", "argv", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_before_any_work(data, tmp_path, capsys, name, argv, message):
    out = tmp_path / "out"
    code = main(argv(data, tmp_path, out))
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert err.startswith("modecl: error: ") and err.count("\n") == 1, err[-2000:]
    assert re.search(message, err), err[-2000:]
    assert not out.exists() or not any(out.iterdir())
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_threads_must_be_a_positive_integer(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--threads", value, "report", "nowhere"])
    assert exit_.value.code == 2 and "--threads" in capsys.readouterr().err


def test_report_of_a_truncated_results_file(tmp_path, capsys):
    (tmp_path / "results.json").write_text('{"schema": "modecl.results/2", "tasks": [')
    assert main(["report", str(tmp_path)]) == 2
    assert "results.json: not a complete results file" in capsys.readouterr().err


def test_a_prompt_longer_than_the_context_is_refused_naming_the_sample(data, tmp_path, capsys):
    model = HOSTS["chameleon"]()
    model.config.get_text_config().max_position_embeddings = 24  # the color prompts need 25+
    model.save_pretrained(tmp_path / "short")
    tokenizer().save_pretrained(tmp_path / "short")
    out = tmp_path / "out"
    assert main(train_argv(data, out, model=tmp_path / "short")) == 2
    err = capsys.readouterr().err
    assert "color.jsonl:1: the image, question and answer take" in err
    assert "more than the host's context of 24" in err
    assert not (out / "run.json").exists()


# --- images of any mode and bit depth -----------------------------------------------------


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040).astype(np.uint16)  # 0..65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    pixels = np.asarray(read_image(tmp_path / "deep.png"))
    expected = np.rint(ramp / 257).astype(np.uint8)
    assert np.array_equal(pixels[..., 0], expected) and np.array_equal(pixels[..., 2], expected)


@pytest.mark.parametrize(("background", "value"), [((255, 255, 255), 255), ((0, 0, 0), 0)])
def test_transparency_is_composited_on_the_background(tmp_path, background, value):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2] = (200, 10, 10, 255)  # opaque red top, transparent bottom
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    pixels = np.asarray(read_image(tmp_path / "alpha.png", background))
    assert (pixels[:2] == (200, 10, 10)).all() and (pixels[2:] == value).all()


# --- readers never fail with anything but their own error ---------------------------------

QUICK = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@seed(0)
@QUICK
@given(st.binary(max_size=300))
def test_any_bytes_load_as_jsonl_or_raise_the_task_file_error(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("jsonl") / "task.jsonl"
    path.write_bytes(blob)
    try:
        list(read_jsonl(path, ("question",), ("answer",), ("question",)))
    except TaskFileError as err:
        assert str(err).startswith(str(path))


@seed(0)
@QUICK
@given(st.binary(max_size=300))
def test_any_bytes_load_as_toml_or_raise_the_config_error(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("toml") / "config.toml"
    path.write_bytes(blob)
    try:
        load_toml(TrainConfig, path)
    except ConfigError as err:
        assert str(err).startswith(str(path))


# Every key that holds a count or a rate, with a value outside its range.
OUT_OF_RANGE = st.sampled_from(
    [
        ("continual", "train", "epochs"),
        ("continual", "train", "batch_size"),
        ("continual", "train", "lr"),
        ("continual", "train", "grad_clip"),
        ("continual", "adapter", "rank"),
        ("continual", "adapter", "num_experts"),
        ("continual", "distill", "top_k"),
        ("continual", "distill", "temperature"),
        ("continual", "distill", "batch_size"),
        ("continual", "ewc", "fisher_batches"),
        ("continual", "monitor", "every"),
        ("eval", "samples_per_digit"),
        ("host", "pretrain", "epochs"),
        ("host", "model", "num_layers"),
    ]
)


@seed(0)
@QUICK
@given(OUT_OF_RANGE, st.one_of(st.integers(max_value=0), st.sampled_from([float("nan"), -1e9])))
def test_any_value_outside_its_range_is_refused_at_load(keys, value):
    tree: dict = {}
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    with pytest.raises(ConfigError, match=rf"{'.'.join(keys)}: (.* is out of range|expected int)"):
        from_dict(RunConfig, tree)


# --- outputs: permissions, leftovers, inputs edited between a crash and the resume ---------


def test_outputs_honour_the_umask_and_a_resume_cleans_up(data, tmp_path, monkeypatch):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert main(train_argv(data, out, extra=("--methods", "seq-lora"))) == 0
        modes = {p.relative_to(out): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
        assert {m for p, m in modes.items() if (out / p).is_file()} == {0o644}
        assert {m for p, m in modes.items() if (out / p).is_dir()} == {0o755}
        # A kill inside writes: a half-written stage folder and results file stay behind.
        (out / "checkpoints" / "seed0" / "seq-lora" / f".stage2{TEMP_MARK}abc").mkdir()
        (out / f".results.json{TEMP_MARK}xyz").write_text('{"half')
        assert main(train_argv(data, out, extra=("--methods", "seq-lora"))) == 0
        assert not [p for p in out.rglob("*") if TEMP_MARK in p.name]
        assert read_results(out / "results.json").tasks == ["color", "shape"]
    finally:
        os.umask(old)


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "results.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_a_resume_with_an_edited_task_file_is_refused_naming_it(data, tmp_path, capsys):
    copy = tmp_path / "data"
    files, pairs = write_tasks(copy)
    argv = train_argv(
        data, tmp_path / "run", tasks=files, pairs=pairs, extra=("--methods", "seq-lora")
    )
    assert main(argv) == 0
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "seed0" / "seq-lora" / "stage2")
    files[1].write_text(files[1].read_text().replace('"answer": "a"', '"answer": "b"', 1))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "input files have changed since it started" in err and "shape.jsonl" in err
    assert "color.jsonl" not in err.split("started:")[1]


# --- images of five shapes (Emu3 keeps the aspect ratio) ----------------------------------


def test_emu3_with_images_of_five_shapes_trains_and_draws_every_pair(tmp_path):
    host = write_host("emu3", tmp_path / "host")
    Emu3ImageProcessor(min_pixels=32, max_pixels=200, spatial_factor=2).save_pretrained(host)
    files, pairs = write_tasks(tmp_path / "data")
    sizes = [(8, 8), (12, 8), (8, 12), (16, 6), (6, 14)]
    for i, png in enumerate(sorted((tmp_path / "data" / "images").glob("*.png"))):
        with Image.open(png) as image:
            image.resize(sizes[i % 5]).save(png)
    config = tmp_path / "train.toml"
    config.write_text(
        TRAIN_CONFIG.replace("image_size = 8\n", "").replace("draws = 2", "draws = 4")
    )
    out = tmp_path / "out"
    argv = ["train", "--model", str(host), "--tasks", *map(str, files), "--kd-data", str(pairs)]
    assert main([*argv, "--methods", "mode", "--config", str(config), "--out", str(out)]) == 0
    shapes = set(read_token_cache(out / "image_tokens").values())
    assert len({len(s) for s in shapes}) >= 4  # spans of different lengths
    results = read_results(out / "results.json")
    for stage in [results.mean.pretrained, *results.mean.methods["mode"].stages]:
        assert stage.measures["pairs_generation"]["drawn"] == 4
        drawn = [Image.open(f).size for f in stage.measures["pairs_generation"]["images"]]
        assert len(set(drawn)) > 1  # each pair drawn at its own image's shape
