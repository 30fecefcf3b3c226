"""`modecl train` end to end on tiny random Chameleon and Emu3 checkpoints saved to disk."""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import warnings
from dataclasses import replace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from modecl.cli import main
from modecl.core.adapters import adapter_state_dict, attach_adapters, load_adapters
from modecl.core.config import ConfigError, load_toml
from modecl.core.evaluate import answer
from modecl.core.generation import generate
from modecl.core.methods import get_method
from modecl.core.results import read_results
from modecl.core.sequences import IGNORE, DrawPair, understand
from modecl.core.tasks import Sample, TaskFileError
from modecl.hosts.config import TrainConfig
from modecl.hosts.host import image_tokens, understand_prompt
from modecl.hosts.tasks import (
    HostFormat,
    ImageTokenizer,
    load_image_task,
    load_pairs,
)
from modecl.hosts.token_cache import TokenStore
from modecl.hosts.world import load_host
from tests.fixtures import (
    HOSTS,
    IMAGE_HOSTS,
    pixels,
    tokenizer,
    train_command,
    train_inputs,
    write_host,
    write_jsonl,
    write_tasks,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Both hosts, the task and pairs files, a tiny CLIP, and a config using it."""
    inputs = train_inputs(tmp_path_factory.mktemp("hf"))
    hosts = {family: write_host(family, inputs["root"] / family) for family in IMAGE_HOSTS}
    return inputs | {"hosts": hosts}


def train(setup, family, methods, out, *extra):
    return train_command(setup, setup["hosts"][family], methods, out, *extra)


def reloaded(setup, family, method, adapters):
    """A fresh host from disk with the saved adapters loaded, and its format."""
    model, tok = load_host(str(setup["hosts"][family]), "float32", torch.device("cpu"))
    config = load_toml(TrainConfig, setup["config"])
    attach_adapters(model, get_method(method).adapter_config(config.continual))
    load_adapters(model, adapters)
    return model, HostFormat.from_model(model, tok)


@pytest.fixture(scope="module", params=list(IMAGE_HOSTS))
def two_methods_two_seeds(request, setup, tmp_path_factory):
    """`modecl train --methods mode,seq-lora --seeds 2` on one tiny host."""
    out = tmp_path_factory.mktemp(f"run-{request.param}")
    assert train(setup, request.param, "mode,seq-lora", out, "--seeds", "2") == 0
    return request.param, out


def test_train_end_to_end(setup, two_methods_two_seeds):
    family, out = two_methods_two_seeds
    results = read_results(out / "results.json")
    assert results.schema == "modecl.results/2" and results.front == "train"
    assert results.tasks == ["color", "shape"] and results.seeds == [0, 1]
    assert results.scoring == {"color": "exact", "shape": "choice"}
    assert set(results.mean.methods) == {"mode", "seq-lora"} and results.std is not None
    host = results.world["host"]
    assert host["checkpoint"] == str(setup["hosts"][family]) and len(host["config_sha256"]) == 64
    manifest = results.manifest
    assert {k: v["samples"] for k, v in manifest["tasks"]["color"].items()} == {
        "train": 8,
        "test": 4,
    }
    assert (
        manifest["tasks"]["color"]["test"]["sha256"] != manifest["tasks"]["shape"]["test"]["sha256"]
    )
    assert {"modecl", "torch", "transformers"} <= set(manifest["packages"])
    for seed in results.per_seed:
        for name, entry in seed.methods.items():
            matrix = entry.accuracy_matrix
            assert len(matrix) == 2 and all(0 <= v <= 1 for row in matrix for v in row)
            assert entry.summary["final_average_accuracy"] == pytest.approx(sum(matrix[-1]) / 2)
            assert entry.summary["bwt"] == pytest.approx(matrix[1][0] - matrix[0][0])
            # The open-ended color task has no closed answer set; the multiple-choice one has.
            assert all(
                row[0] is None and 0 <= row[1] <= 1 for row in entry.constrained_accuracy_matrix
            )
            for stage in entry.stages:
                assert stage.final_loss < math.log(64)  # below chance over the 64-id vocabulary
                assert stage.conflict["steps"] == 1  # monitored: step 0 of 2 per epoch, every 10
                assert len(stage.losses["ce"]) == 8  # 4 epochs of 2 batches
                assert len(stage.losses.get("kd", [])) == (8 if name == "mode" else 0)
    final = [s.methods["mode"].summary["final_average_accuracy"] for s in results.per_seed]
    assert results.mean.methods["mode"].summary["final_average_accuracy"] == pytest.approx(
        sum(final) / 2
    )
    for stage in [results.mean.pretrained, *results.per_seed[1].methods["mode"].stages]:
        assert stage.measures["image_nll"] > 0
        generation = stage.measures["pairs_generation"]
        assert generation["drawn"] == 2
        if family == "emu3":  # decoded to PNG and scored by the tiny CLIP
            assert generation["clip"]["status"] == "ok"
            assert -1 <= stage.measures["pairs_clip_image_own"] <= 1
            assert len(generation["images"]) == 2
        else:
            assert generation["clip"]["status"] == "unavailable"
            assert "decoder" in generation["clip"]["reason"]
    report = (out / "report.md").read_text()
    for figure in ("accuracy_matrices", "constrained_accuracy_matrices", "losses", "conflict"):
        assert f"figures/{figure}.png" in report and (out / "figures" / f"{figure}.png").exists()
    assert "## Gradient conflict" in report and "| mode | " in report
    if family == "emu3":
        assert (out / "figures" / "samples_mode.png").exists() and "pairs CLIP-I own" in report


def test_saved_adapters_reproduce_the_recorded_answers(setup, two_methods_two_seeds):
    family, out = two_methods_two_seeds
    last = out / "checkpoints" / "seed1" / "mode" / "stage2"
    model, fmt = reloaded(setup, family, "mode", last / "adapters")
    trained = adapter_state_dict(model)
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)
    recorded = json.loads((last / "stage.json").read_text())["answers"]
    images = ImageTokenizer(model, 8)
    for file in setup["files"]:
        task = load_image_task(file, images)
        answers = answer(model, fmt, task.test, max_new_tokens=4)
        assert answers == recorded[task.name]


def test_a_run_killed_between_stages_resumes_to_the_same_results(
    setup, two_methods_two_seeds, tmp_path
):
    family, first = two_methods_two_seeds
    shutil.copytree(first, tmp_path / "run")
    out = tmp_path / "run"
    # As if killed in seed 1's seq-lora second task: that stage and the results are missing.
    shutil.rmtree(out / "checkpoints" / "seed1" / "seq-lora" / "stage2")
    (out / "results.json").unlink()
    assert len(TokenStore(out / "image_tokens")) == 12  # every image once
    if family == "chameleon":  # (Emu3's CLIP scoring reads the real test images)
        shutil.rmtree(setup["root"] / "data" / "images")
    try:  # the resumed run reads the images' tokens back, not the images
        assert train(setup, family, "mode,seq-lora", out, "--seeds", "2") == 0
    finally:
        write_tasks(setup["root"] / "data")
    again, before = read_results(out / "results.json"), read_results(first / "results.json")
    for a, b in zip(again.per_seed, before.per_seed, strict=True):
        for name in ("mode", "seq-lora"):
            assert a.methods[name].accuracy_matrix == b.methods[name].accuracy_matrix
            for x, y in zip(a.methods[name].stages, b.methods[name].stages, strict=True):
                assert (x.measures["image_nll"], x.losses) == (y.measures["image_nll"], y.losses)
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0  # rebuilt from results.json
    assert "| after | color | shape |" in (out / "report.md").read_text()


def test_resume_refuses_another_configuration(setup, tmp_path, capsys):
    assert train(setup, "chameleon", "seq-lora", tmp_path) == 0
    other = setup["config"].read_text().replace("lr = 0.02", "lr = 0.03")
    (tmp_path / "other.toml").write_text(other)
    assert (
        train(setup, "chameleon", "seq-lora", tmp_path, "--config", str(tmp_path / "other.toml"))
        == 2
    )
    assert "other settings" in capsys.readouterr().err
    assert train(setup, "chameleon", "seq-lora,lwf", tmp_path) == 0  # more methods extend it


def test_a_load_failure_leaves_the_out_dir_unclaimed(setup, tmp_path, capsys):
    """A mistyped --model or a bad dtype stop before the run key is written: the corrected
    command then runs in the same out dir."""
    argv = ["train", "--model", str(tmp_path / "typo"), "--tasks", *map(str, setup["files"])]
    argv += ["--methods", "seq-lora", "--out", str(tmp_path / "out")]
    assert main([*argv, "--config", str(setup["config"])]) == 2
    assert "cannot load a host model" in capsys.readouterr().err
    assert not (tmp_path / "out" / "run.json").exists()
    assert train(setup, "chameleon", "seq-lora", tmp_path / "out") == 0


def test_too_few_pairs_for_a_distillation_batch_are_refused_before_training(
    setup, tmp_path, capsys
):
    config = (
        setup["config"]
        .read_text()
        .replace("[continual.distill]\nbatch_size = 4", "[continual.distill]\nbatch_size = 9")
    )
    (tmp_path / "big.toml").write_text(config)
    assert (
        train(setup, "chameleon", "mode", tmp_path / "out", "--config", str(tmp_path / "big.toml"))
        == 2
    )
    err = capsys.readouterr().err
    assert "pairs.jsonl" in err and "only 8 training pairs" in err and "batch_size" in err
    assert not (tmp_path / "out" / "run.json").exists()


def test_gradient_checkpointing_trains_the_same(setup, tmp_path):
    config = setup["config"].read_text().replace("[host]", "[host]\ngradient_checkpointing = true")
    (tmp_path / "ckpt.toml").write_text(config)
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    assert train(setup, "chameleon", "mode", plain) == 0
    ckpt = ["--config", str(tmp_path / "ckpt.toml")]  # the later --config wins
    assert train(setup, "chameleon", "mode", checkpointed, *ckpt) == 0
    for stage in ("stage1", "stage2"):
        path = pathlib.Path("checkpoints", "seed0", "mode", stage, "stage.json")
        a = json.loads((plain / path).read_text())
        b = json.loads((checkpointed / path).read_text())
        assert b["stage"]["final_loss"] == pytest.approx(a["stage"]["final_loss"], rel=1e-5)
        assert b["answers"] == a["answers"]


def test_compiled_adapters_train_the_same(setup, tmp_path):
    """`compile_adapters = true`: the routed layers compiled, training, distillation,
    answering and drawing alike (dropout 0: the compiled graph draws its own masks)."""
    plain_config = setup["config"].read_text() + "[continual.adapter]\ndropout = 0.0\n"
    compiled_config = plain_config.replace("[host]", "[host]\ncompile_adapters = true")
    runs = []
    for name, config in (("plain", plain_config), ("compiled", compiled_config)):
        (tmp_path / f"{name}.toml").write_text(config)
        options = ["--config", str(tmp_path / f"{name}.toml")]  # the later --config wins
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "torch.compile of the adapters failed")
            assert train(setup, "chameleon", "mode", tmp_path / name, *options) == 0
        runs.append(tmp_path / name)
    for stage in ("stage1", "stage2"):
        path = pathlib.Path("checkpoints", "seed0", "mode", stage, "stage.json")
        a, b = (json.loads((run / path).read_text()) for run in runs)
        assert b["stage"]["final_loss"] == pytest.approx(a["stage"]["final_loss"], rel=1e-4)
        assert b["answers"] == a["answers"]


def test_cli_errors(setup, tmp_path, capsys):
    assert train(setup, "chameleon", "no-such-method", tmp_path / "a") == 2
    assert "unknown method(s) ['no-such-method']" in capsys.readouterr().err
    argv = ["train", "--model", str(tmp_path / "nowhere"), "--tasks", str(setup["files"][0])]
    assert main([*argv, "--method", "seq-lora", "--out", str(tmp_path / "b")]) == 2
    assert "cannot load a host model and tokenizer from" in capsys.readouterr().err
    argv = ["train", "--model", str(setup["hosts"]["chameleon"]), "--tasks", "nope.jsonl"]
    assert main([*argv, "--method", "seq-lora", "--out", str(tmp_path / "c")]) == 2
    assert "nope.jsonl: file not found" in capsys.readouterr().err
    argv = ["train", "--model", "nowhere", "--tasks", *map(str, setup["files"] * 2)]
    assert main([*argv, "--method", "seq-lora", "--out", str(tmp_path / "d")]) == 2
    assert "task names (the files' stems, the folders' names) repeat" in capsys.readouterr().err
    argv = ["train", "--model", "nowhere", "--tasks", str(setup["files"][0])]
    assert main([*argv, "--method", "lwf", "--out", str(tmp_path / "e")]) == 2
    assert "method(s) ['lwf'] distil: give --kd-data" in capsys.readouterr().err
    argv = ["train", "--model", "nowhere", "--tasks", str(setup["files"][0])]
    assert main([*argv, "--methods", "seq-lora,seq-lora", "--out", str(tmp_path / "f")]) == 2
    assert "methods repeat" in capsys.readouterr().err


@pytest.fixture(scope="module")
def chameleon_images():
    model = HOSTS["chameleon"]()
    return model, ImageTokenizer(model, 8)


def write(tmp_path, *rows):
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "images" / "ok.png")
    (tmp_path / "images" / "bad.png").write_bytes(b"not a PNG")
    return write_jsonl(tmp_path / "task.jsonl", *rows)


GOOD = {"image": "images/ok.png", "question": "what color is it ?", "answer": "red"}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({**GOOD, "image": "images/missing.png", "split": "train"}, "field 'image': image file"),
        ({**GOOD, "image": "images/bad.png", "split": "train"}, "field 'image': cannot read image"),
        ({**GOOD, "split": "dev"}, 'field \'split\': expected "train" or "test"'),
        ({**GOOD, "split": "train", "colour": 1}, "field 'colour': unknown field"),
        (
            {"image": "images/ok.png", "answer": "red", "split": "train"},
            "field 'question': missing",
        ),
        ({**GOOD, "split": "train", "answer": ""}, "field 'answer': expected a non-empty string"),
        ({**GOOD, "split": "train", "scoring": "choice"}, "the choice rule needs options"),
        ({**GOOD, "split": "train", "scoring": "fuzzy"}, "field 'scoring': 'fuzzy' is not one"),
        (
            {**GOOD, "split": "train", "options": ["blue", "green"]},
            "field 'answer': answer 'red' is neither an option letter nor one of",
        ),
        ("{not json", "invalid JSON"),
    ],
)
def test_task_file_errors_name_file_line_and_field(chameleon_images, tmp_path, row, message):
    path = write(tmp_path, {**GOOD, "split": "test"}, row)
    with pytest.raises(TaskFileError) as error:
        load_image_task(path, chameleon_images[1])
    assert f"{path}:2: " in str(error.value)
    assert message in str(error.value)
    if "missing.png" in json.dumps(row):
        assert str(tmp_path / "images" / "missing.png") in str(error.value)


def test_task_file_rules(chameleon_images, tmp_path):
    images = chameleon_images[1]
    choice = {**GOOD, "answer": "b", "options": ["blue", "red"]}
    path = write(tmp_path, {**choice, "split": "train"}, {**choice, "split": "test"})
    task = load_image_task(path, images)
    assert task.scoring == "choice" and task.test[0].options == ("blue", "red")
    assert load_image_task(path, images, scoring="contains").scoring == "contains"
    path = write(tmp_path, {**GOOD, "split": "train"}, {**GOOD, "split": "test"})
    assert load_image_task(path, images).scoring == "exact"
    path = write(tmp_path, {**GOOD, "split": "train"}, {**GOOD, "split": "train"})
    with pytest.raises(TaskFileError, match="no test samples"):
        load_image_task(path, images)
    pairs = write(tmp_path, {"caption": "draw red", "image": "images/ok.png"})
    read = load_pairs(pairs, images)
    assert len(read.train) == 1 and read.test == []


def labelled_ids(example) -> list[int]:
    return [
        t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE
    ]


@pytest.mark.parametrize("family", list(IMAGE_HOSTS))
def test_host_format_sequences(family):
    """Understand prompts equal `understand_prompt`; draw labels cover exactly the span."""
    model = HOSTS[family]()
    fmt = HostFormat.from_model(model, tokenizer())
    body = tuple(image_tokens(model, pixels(1))[0].tolist())
    sample = Sample(body, "what color is it ?", "red")
    expected = understand_prompt(model, torch.tensor(body), sample.question, fmt.encode)
    assert fmt.prompt(sample) == expected.tolist()
    example = understand(fmt, sample)
    assert labelled_ids(example) == [*fmt.encode("red"), fmt.eos_id]
    labelled = labelled_ids(fmt.draw_example(DrawPair("draw red", body)))
    # The span after its head (codes, Emu3's row and frame ends, end of image), then EOS.
    prompt = fmt.prompt(sample)
    span = prompt[prompt.index(body[0]) : len(prompt) - len(fmt.encode(sample.question))]
    assert labelled == [*span, fmt.eos_id]
    ids = torch.tensor(labelled)
    assert fmt.is_image_code(ids).sum() == 16  # the 4x4 codes; markers and EOS are not codes
    assert fmt.is_image_token(ids).tolist() == [*[True] * (len(labelled) - 1), False]


@pytest.mark.parametrize("family", list(IMAGE_HOSTS))
def test_answers_are_the_greedy_tokens_of_the_hosts_own_forward(family):
    """Chameleon's forward masks its image codes, so its answers hold none; Emu3's does not."""
    model = HOSTS[family]()
    fmt = replace(HostFormat.from_model(model, tokenizer()), decode_text=lambda ids: str(ids))
    questions = ["what color is it ?", "which shape ? ( a ) circle ( b ) square", "what ?"]
    bodies = image_tokens(model, pixels(3)).tolist()
    samples = [Sample(tuple(body), q, "red") for body in bodies for q in questions]
    expected, free = [], []
    for sample in samples:
        prompt = torch.tensor([fmt.prompt(sample)])
        sequence = prompt
        for _ in range(6):
            following = model(sequence).logits[:, -1:].argmax(-1)
            sequence = torch.cat([sequence, following], dim=1)
        expected.append(fmt.decode(sequence[0, prompt.shape[1] :].tolist()))
        free.append(generate(model, prompt, 6, eos_id=fmt.eos_id)[0])
    assert answer(model, fmt, samples, max_new_tokens=6, batch_size=4) == expected
    if family == "chameleon":  # unrestricted, lm_head's logits would answer with codes
        assert fmt.is_image_code(torch.stack(free)).any()


def ints(rows) -> list[tuple[int, ...]]:
    """Token rows (views into a token store) as tuples of ints."""
    return [tuple(row.tolist()) for row in rows]


def test_image_tokenizer_batches_and_store(setup, tmp_path, monkeypatch):
    model = HOSTS["emu3"]()
    folder = setup["root"] / "data" / "images"
    files = [(folder / f"{i}.png", "") for i in [*range(12), 3]]  # one file twice
    small = ImageTokenizer(model, 8, batch_size=5, progress=False, folder=tmp_path / "tokens")
    tokens = ints(small(files))
    assert not (tmp_path / "tokens").exists()  # staged until every input passed its checks
    small.commit()
    assert tokens == ints(ImageTokenizer(model, 8, batch_size=16, progress=False)(files))
    assert tokens[3] == tokens[12] and len(small.store) == 12 and ints(small(files)) == tokens
    assert len(set(tokens)) > 1  # the images differ, and so do their tokens
    monkeypatch.setattr(ImageTokenizer, "_tokenize", None)  # nothing is tokenized again
    again = ImageTokenizer(model, 8, progress=False, folder=tmp_path / "tokens")
    assert ints(again(files)) == tokens and len(again.store) == 12
    with pytest.raises(ConfigError, match="made by another host or image size"):
        ImageTokenizer(model, 16, progress=False, folder=tmp_path / "tokens")


@pytest.mark.parametrize("family", list(IMAGE_HOSTS))
def test_bfloat16_host_with_float32_adapters(setup, family, tmp_path):
    """The GPU setting (a bf16 host), on CPU: training, drawing, decoding, CLIP all run."""
    config = setup["config"].read_text().replace("[host]", '[host]\ndtype = "bfloat16"')
    (tmp_path / "bf16.toml").write_text(config)
    out = tmp_path / "out"
    assert train(setup, family, "mode", out, "--config", str(tmp_path / "bf16.toml")) == 0
    stages = read_results(out / "results.json").mean.methods["mode"].stages
    assert all(math.isfinite(s.measures["image_nll"]) and s.final_loss < 5 for s in stages)
    adapters = out / "checkpoints" / "seed0" / "mode" / "stage2" / "adapters"
    saved = load_file(adapters / "adapters.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}


def test_modecl_eval_reproduces_the_recorded_answers_of_a_stage(
    setup, two_methods_two_seeds, capsys
):
    _, out = two_methods_two_seeds
    argv = ["eval", str(out), "--seed", "1", "--method", "mode", "--stage", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| color |" in printed and "| shape |" in printed
    written = json.loads((out / "eval" / "seed1-mode-stage1.json").read_text())
    recorded = json.loads(
        (out / "checkpoints" / "seed1" / "mode" / "stage1" / "stage.json").read_text()
    )
    assert written["answers"] == recorded["answers"]
    assert written["task_accuracy"] == recorded["stage"]["task_accuracy"]
    assert written["constrained_task_accuracy"] == recorded["stage"]["constrained_task_accuracy"]
    assert written["measures"]["image_nll"] == pytest.approx(
        recorded["stage"]["measures"]["image_nll"], rel=1e-6
    )
    # Another task file: only that task is scored.
    assert main(["eval", str(out), "--tasks", str(setup["files"][1])]) == 0
    assert "| shape |" in capsys.readouterr().out
    assert main(["eval", str(out), "--method", "lwf"]) == 2
    assert "no method 'lwf'" in capsys.readouterr().err


def test_modecl_eval_reproduces_cl_moe_and_o_lora_from_their_saved_adapters(
    setup, tmp_path, capsys
):
    """Their inference needs more than the experts: CL-MoE's task gates and prototypes, and
    O-LoRA's every-task sum, sized by the run's sequence: all in the saved adapters."""
    out = tmp_path / "run"
    assert train(setup, "chameleon", "cl-moe,o-lora", out) == 0
    for method in ("cl-moe", "o-lora"):
        assert main(["eval", str(out), "--method", method, "--stage", "2"]) == 0
        written = json.loads((out / "eval" / f"seed0-{method}-stage2.json").read_text())
        stage = out / "checkpoints" / "seed0" / method / "stage2" / "stage.json"
        assert written["answers"] == json.loads(stage.read_text())["answers"]
    capsys.readouterr()


def test_bf16_autocast_trains_with_float32_adapters(setup, tmp_path):
    """Mixed precision on CPU: the step runs under bfloat16 autocast (its losses differ from
    float32's, slightly), the adapters and what is saved stay float32."""
    runs = {}
    for precision in ("no", "bf16"):
        config = (
            setup["config"]
            .read_text()
            .replace("[continual.train]", f'[continual.train]\nmixed_precision = "{precision}"')
        )
        (tmp_path / f"{precision}.toml").write_text(config)
        out = tmp_path / precision
        argv = ["--config", str(tmp_path / f"{precision}.toml")]
        assert train(setup, "chameleon", "seq-lora", out, *argv) == 0
        runs[precision] = read_results(out / "results.json").mean.methods["seq-lora"].stages
    plain, mixed = runs["no"], runs["bf16"]
    for a, b in zip(plain, mixed, strict=True):
        assert a.losses["ce"] != b.losses["ce"]  # autocast did run in bfloat16
        assert b.losses["ce"] == pytest.approx(a.losses["ce"], rel=0.05)
        assert all(math.isfinite(x) for x in b.losses["ce"])
    adapters = tmp_path / "bf16" / "checkpoints" / "seed0" / "seq-lora" / "stage2" / "adapters"
    saved = load_file(adapters / "adapters.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}


def scalars(folder: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the TensorBoard event files under ``folder`` hold, by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            out.setdefault(tag, [])
            out[tag] += [(e.step, e.value) for e in accumulator.Scalars(tag)]
    return {tag: sorted(set(values)) for tag, values in out.items()}


def test_tensorboard_tracking_logs_steps_and_stages_and_resumes_into_the_same_run(setup, tmp_path):
    config = setup["config"].read_text() + '\n[tracking]\nlog_with = ["tensorboard"]\n'
    (tmp_path / "tb.toml").write_text(config)
    out = tmp_path / "run"
    argv = ["--config", str(tmp_path / "tb.toml")]
    assert train(setup, "chameleon", "mode", out, *argv) == 0
    run_id = (out / "tracking" / "run_id").read_text().strip()
    logged = scalars(out / "tracking" / run_id)
    stages = read_results(out / "results.json").mean.methods["mode"].stages
    ce = [x for s in stages for x in s.losses["ce"]]
    assert [v for _, v in logged["mode/seed0/loss/ce"]] == pytest.approx(ce)
    assert [n for n, _ in logged["mode/seed0/loss/ce"]] == list(range(16))  # 2 tasks x 8 steps
    assert len(logged["mode/seed0/loss/kd"]) == 16 and len(logged["mode/seed0/grad_norm"]) == 16
    lr = [v for _, v in logged["mode/seed0/lr"]]
    assert lr[0] == lr[8] == pytest.approx(0.02) and lr[7] < lr[0]  # a cosine per task
    accuracy = [v for _, v in logged["mode/seed0/accuracy/color"]]
    assert accuracy == pytest.approx([s.task_accuracy[0] for s in stages])
    nll = [v for _, v in logged["mode/seed0/measures/image_nll"]]
    assert nll == pytest.approx([s.measures["image_nll"] for s in stages])
    # Killed in the second task: the resumed run logs into the same run, from step 8 on.
    shutil.rmtree(out / "checkpoints" / "seed0" / "mode" / "stage2")
    assert train(setup, "chameleon", "mode", out, *argv) == 0
    assert (out / "tracking" / "run_id").read_text().strip() == run_id
    assert [p.name for p in (out / "tracking").iterdir() if p.is_dir()] == [run_id]
    again = scalars(out / "tracking" / run_id)["mode/seed0/loss/ce"]
    assert [n for n, _ in again] == list(range(16))  # steps 8..15 logged again, same steps
