"""Bad input gets one clear error before any work; outputs are complete, readable, cleaned up.

The table drives the command line as a user would: each case exits 2 with a message that
names the file and the line / record / field, or the key, and leaves the out dir (and the
host cache) untouched.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import stat
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure
from PIL import Image
from transformers import Emu3ImageProcessor

from modecl.cli import main
from modecl.core.config import ConfigError, from_dict, load_toml
from modecl.core.files import TEMP_MARK, atomic_dir, read_image, write_atomic
from modecl.core.results import read_results
from modecl.core.tasks import TaskFileError, read_jsonl
from modecl.core.train import StepLoss
from modecl.digits.config import RunConfig
from modecl.hosts.config import TrainConfig
from modecl.hosts.token_cache import TokenStore
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


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png() -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD_PNG = _png()
_DATA = GOOD_PNG.index(b"IDAT") + 14
BAD_IMAGES = {
    "corrupt.png": GOOD_PNG[:_DATA] + bytes(20) + GOOD_PNG[_DATA + 20 :],
    "truncated.png": GOOD_PNG[: len(GOOD_PNG) // 2],
    "empty.png": b"",
    "text.png": b"a text file\n",
    # A header of 14000 x 14000 pixels: PIL refuses it as a decompression bomb on opening.
    "huge.png": b"\x89PNG\r\n\x1a\n"
    + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 14000, 14000, 8, 2, 0, 0, 0))
    + _png_chunk(b"IEND", b""),
}


def image_task(data, name: str) -> Path:
    """The color task with the image of line 3 replaced by the bad image ``name``."""
    written(data["root"] / "data" / "images", name, BAD_IMAGES[name])
    line = {"image": f"images/{name}", "question": "what color is it ?", "answer": "red"}
    return bad_line(
        data, None, f"task-{name}.jsonl", json.dumps(line | {"split": "train"}).encode()
    )


def pairs_file(data, name: str, rows: list[dict]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    return written(data["root"] / "data", name, text)  # beside the images


def concepts_file(tmp_path) -> Path:
    """A concept whose first reference image is 0 bytes."""
    (tmp_path / "refs").mkdir()
    written(tmp_path / "refs", "0.png", b"")
    line = {"concept": "red", "prompts": ["draw red"], "images": "refs"}
    return written(tmp_path, "concepts.jsonl", json.dumps(line) + "\n")


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


# Found once the host has loaded (images read, prompts measured in tokens): the same one
# line, after the progress bars, and the out dir still untouched.
LOADED = [
    *[
        (
            f"image {name}",
            lambda d, t, o, name=name: train_argv(d, o, tasks=[image_task(d, name)]),
            rf"task-{re.escape(name)}\.jsonl:3: field 'image': cannot read image .*{message}",
        )
        for name, message in (
            ("corrupt.png", "broken data stream"),
            ("truncated.png", "image file is truncated"),
            ("empty.png", "cannot identify image file"),
            ("text.png", "cannot identify image file"),
            ("huge.png", "Image size \\(196000000 pixels\\) exceeds limit"),
        )
    ],
    (
        "a question longer than the context",
        lambda d, t, o: train_argv(
            d,
            o,
            tasks=[
                bad_line(
                    d,
                    t,
                    "long.jsonl",
                    json.dumps(
                        {"image": "images/0.png", "question": "what " * 5000, "answer": "red"}
                        | {"split": "train"}
                    ).encode(),
                )
            ],
        ),
        r"long\.jsonl:3: the image, question and answer take \d+ tokens, more than the host's "
        r"context of 4096",
    ),
    (
        "a corrupt pair image",
        lambda d, t, o: train_argv(
            d,
            o,
            pairs=pairs_file(
                d,
                "corrupt-pairs.jsonl",
                [{"caption": "draw red", "image": "images/corrupt.png"}] * 4,
            ),
        ),
        r"corrupt-pairs\.jsonl:1: field 'image': cannot read image .*corrupt\.png",
    ),
    (
        "pairs all of split test",
        lambda d, t, o: train_argv(
            d,
            o,
            pairs=pairs_file(
                d,
                "test-pairs.jsonl",
                [
                    {"caption": "draw red", "image": f"images/{i}.png", "split": "test"}
                    for i in (0, 1, 2)
                ],
            ),
        ),
        r"test-pairs\.jsonl: method 'mode' distils from train pairs, but all 3 pairs given are "
        r'split "test" \(they only evaluate image generation\): give pairs of split "train"',
    ),
    (
        "a 0-byte concept reference image",
        lambda d, t, o: train_argv(d, o, extra=("--concepts", str(concepts_file(t)))),
        r"concepts\.jsonl:1: field 'images': cannot read image .*0\.png",
    ),
]


@pytest.mark.parametrize(("name", "argv", "message"), LOADED, ids=[c[0] for c in LOADED])
def test_bad_input_found_after_loading_leaves_nothing_in_the_out_dir(
    data, tmp_path, capsys, name, argv, message
):
    out = tmp_path / "out"
    code = main(argv(data, tmp_path, out))
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    last = err.splitlines()[-1]
    assert last.startswith("modecl: error: ") and err.count("modecl: error") == 1, err[-2000:]
    assert re.search(message, last), err[-2000:]
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_threads_must_be_a_positive_integer(value, capsys):
    assert main(["--threads", value, "report", "nowhere"]) == 2
    assert capsys.readouterr().err.startswith("modecl: error: argument --threads: ")


def read_only(monkeypatch, folder: Path) -> None:
    """Make ``folder`` look like a read-only mount to the checks (a test may not mount one,
    and root writes anywhere else)."""
    access, statvfs = os.access, os.statvfs

    def no_write(path, mode, **kwargs):
        return not (Path(path) == folder and mode & os.W_OK) and access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", no_write)
    monkeypatch.setattr(
        os,
        "statvfs",
        lambda p: SimpleNamespace(f_flag=os.ST_RDONLY) if Path(p) == folder else statvfs(p),
    )


@pytest.mark.parametrize("inside", [False, True], ids=["the folder", "a new folder in it"])
@pytest.mark.parametrize("front", ["train", "bench"])
def test_an_out_dir_on_a_read_only_mount_is_one_clear_error_before_any_work(
    data, tmp_path, capsys, monkeypatch, front, inside
):
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(monkeypatch, locked)
    out = locked / "run" if inside else locked
    argv = train_argv(data, out) if front == "train" else bench_argv(tmp_path, out)
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"modecl: error: --out {out}: cannot write into {locked}: a read-only file system\n"
    )
    assert not any(locked.iterdir()) and not (tmp_path / "cache").exists()


def test_a_full_disk_is_one_line_and_leaves_the_previous_file_or_none(
    data, tmp_path, capsys, monkeypatch
):
    def filling(fig, path, **kwargs):
        Path(path).write_bytes(GOOD_PNG[:40])  # what fitted
        raise OSError(errno.ENOSPC, "No space left on device")

    figure = tmp_path / "run" / "figures" / "accuracy_matrices.png"
    monkeypatch.setattr(Figure, "savefig", filling)
    assert main(train_argv(data, tmp_path / "run", extra=("--methods", "seq-lora"))) == 1
    err = capsys.readouterr().err
    assert err.endswith(f"\nmodecl: error: {figure}: No space left on device\n")
    assert read_results(tmp_path / "run" / "results.json").tasks == ["color", "shape"]
    assert not figure.exists()  # none, not a part
    monkeypatch.undo()
    assert main(["report", str(tmp_path / "run")]) == 0  # with space, a rerun repairs it
    complete = figure.read_bytes()
    monkeypatch.setattr(Figure, "savefig", filling)
    assert main(["report", str(tmp_path / "run")]) == 1
    assert figure.read_bytes() == complete  # the previous one
    assert not [p for p in (tmp_path / "run").rglob("*") if TEMP_MARK in p.name]


@pytest.mark.parametrize(("sent", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_says_where_the_run_stopped_and_that_it_resumes(
    data, tmp_path, capsys, monkeypatch, ctrl_c, sent, code
):
    steps, forward = [], StepLoss.forward

    def interrupted(self, *args):
        steps.append(len(steps))
        if len(steps) == 11:  # the third step of task 2 (8 steps a task)
            os.kill(os.getpid(), sent)
        return forward(self, *args)

    monkeypatch.setattr(StepLoss, "forward", interrupted)
    argv = train_argv(data, tmp_path / "run", extra=("--methods", "seq-lora"))
    assert main(argv) == code
    assert capsys.readouterr().err.endswith(
        "\nmodecl: interrupted at task 2, step 2 (seq-lora, seed 0); run the same command to "
        "resume\n"
    )
    monkeypatch.undo()
    assert main(argv) == 0
    assert read_results(tmp_path / "run" / "results.json").tasks == ["color", "shape"]


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
    assert not out.exists()


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


def test_a_folder_write_on_a_full_disk_names_the_folder_and_keeps_the_previous_one(tmp_path):
    stage = tmp_path / "stage1"
    with atomic_dir(stage) as tmp:
        (tmp / "stage.json").write_text("complete")
    with pytest.raises(OSError) as error, atomic_dir(stage) as tmp:
        (tmp / "stage.json").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert (error.value.errno, error.value.filename) == (errno.ENOSPC, str(stage))
    assert [p.name for p in tmp_path.iterdir()] == ["stage1"]
    assert (stage / "stage.json").read_text() == "complete"


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
    shapes = {tuple(codes.tolist()) for codes in TokenStore(out / "image_tokens").values()}
    assert len({len(s) for s in shapes}) >= 4  # spans of different lengths
    results = read_results(out / "results.json")
    for stage in [results.mean.pretrained, *results.mean.methods["mode"].stages]:
        assert stage.measures["pairs_generation"]["drawn"] == 4
        drawn = [Image.open(f).size for f in stage.measures["pairs_generation"]["images"]]
        assert len(set(drawn)) > 1  # each pair drawn at its own image's shape
