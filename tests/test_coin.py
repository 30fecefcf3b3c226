"""CoIN's task folders (train.json, test.json and a separate image root) read as they are,
trained on by `modecl train` with no conversion step, and refused record by record."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from modecl.cli import main
from modecl.core.evaluate import credit
from modecl.core.results import read_results
from modecl.core.scoring import score
from modecl.core.tasks import TaskFileError
from modecl.hosts.coin import coin_rows, folder_name, load_coin_task, parse_options
from modecl.hosts.tasks import ImageTokenizer, check_task_file, load_image_task
from tests.fixtures import HOSTS, IMAGE_HOSTS, TRAIN_CONFIG, write_host, write_tasks

SHAPE_QUESTION = "which shape ?\nA. circle\nB. square"
COLOR_QUESTION = "what color is it ?"
OTHER = {"red": "blue", "blue": "green", "green": "red"}


def annotators(color: str, i: int) -> list[str]:
    """Ten annotators' answers: `color` from 2 + i % 3 of them (credit 0.6, 0.9 or 1.0), and
    from two more as "The Color!", which is `color` once processed as the VQA evaluator does
    (then 4, 5 or 6 of ten: credit 1.0)."""
    agree = 2 + i % 3
    variant = f"The {color.title()}!"
    return [color] * agree + [variant] * 2 + [OTHER[color]] * (8 - agree)


def coin_records() -> dict[str, dict[str, list[dict]]]:
    """A ScienceQA-like and a TextVQA-like task over `write_tasks`' twelve images (eight to
    train on, four to test): train records in LLaVA's form, test records in CoIN's."""
    tasks: dict[str, dict[str, list[dict]]] = {
        name: {"train": [], "test": []} for name in ("ScienceQA", "TextVQA")
    }
    for i in range(12):
        color, square = ("red", "blue", "green")[i % 3], i % 2 == 0
        image = f"images/{i}.png"
        for name, question, answer in (
            ("ScienceQA", SHAPE_QUESTION, "B" if square else "A"),
            ("TextVQA", COLOR_QUESTION, color),
        ):
            if i < 8:
                turns = [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": answer},
                ]
                tasks[name]["train"].append({"id": str(i), "image": image, "conversations": turns})
            else:
                record = {"question_id": i, "image": image, "text": question, "answer": answer}
                if name == "TextVQA":
                    record["answers"] = annotators(color, i)
                tasks[name]["test"].append(record)
    return tasks


def write_coin(folder: Path, tasks: dict[str, dict[str, list[dict]]]) -> dict[str, Path]:
    """The tasks' folders under `folder`, each with train.json and test.json."""
    paths = {}
    for name, splits in tasks.items():
        paths[name] = folder / name
        paths[name].mkdir(parents=True, exist_ok=True)
        for split, records in splits.items():
            (paths[name] / f"{split}.json").write_text(json.dumps(records, indent=1))
    return paths


@pytest.fixture(scope="module")
def coin(tmp_path_factory):
    """Instruction folders and images apart, as CoIN ships them; both hosts; a config that
    scores TextVQA by CoIN's own rule."""
    root = tmp_path_factory.mktemp("coin")
    jsonl, pairs = write_tasks(root / "cl_dataset")  # images/0.png ... under the image root
    config = root / "train.toml"
    config.write_text(TRAIN_CONFIG + '\n[scoring]\nTextVQA = "vqa"\n')
    return {
        "root": root,
        "images": root / "cl_dataset",
        "jsonl": jsonl,
        "pairs": pairs,
        "config": config,
        "folders": write_coin(root / "Instructions", coin_records()),
        "hosts": {family: write_host(family, root / family) for family in IMAGE_HOSTS},
    }


def train_argv(coin, out, folders=None, family="chameleon", extra=None):
    """`modecl train` on the CoIN folders; `extra` replaces `--image-root` to the images."""
    argv = ["train", "--model", str(coin["hosts"][family]), "--tasks"]
    argv += [str(f) for f in (folders or coin["folders"]).values()]
    argv += ["--methods", "mode", "--kd-data", str(coin["pairs"]), "--config", str(coin["config"])]
    extra = ("--image-root", str(coin["images"])) if extra is None else extra
    return [*argv, "--out", str(out), *extra]


# --- reading -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "options"),
    [
        (SHAPE_QUESTION, ("circle", "square")),
        ("Which?\nA. x\nB. y\nC. z\nAnswer with the option's letter.", ("x", "y", "z")),
        ("Context: A. Lincoln spoke.\nWhich?\nA. x\nB. y", ("x", "y")),  # the last run from A
        ("A.x\nB.  y  ", ("x", "y")),
        ("A. x\r\nB. y\r\n", ("x", "y")),
        ("A. Lincoln spoke. Who?", None),  # one line is no choice
        ("A. x\nC. y", None),  # a letter skipped
        ("a. x\nb. y", None),  # lower-case letters are text
        ("A. x B. y", None),  # options stand on their own lines
        ("what color is it ?", None),
    ],
)
def test_options_are_the_questions_lettered_lines(question, options):
    assert parse_options(question) == options


def test_coin_folders_read_into_the_same_task_as_a_jsonl_file(coin):
    model = HOSTS["chameleon"]()
    images = ImageTokenizer(model, 8, progress=False)
    science = load_coin_task(coin["folders"]["ScienceQA"], images, coin["images"])
    train_json = coin["folders"]["ScienceQA"] / "train.json"
    assert science.name == "ScienceQA" and science.scoring == "choice"  # the paper's rule
    assert (len(science.train), len(science.test)) == (8, 4)
    first = science.train[0]
    assert (first.question, first.answer) == (SHAPE_QUESTION, "B")  # no <image> placeholder
    assert first.options == ("circle", "square") and first.answers is None
    assert first.source == f"{train_json}: record 0"
    assert science.test[3].source == f"{coin['folders']['ScienceQA'] / 'test.json'}: record 3"
    # The same images and answers as write_tasks' JSONL shape task, through the same tokenizer.
    shape = load_image_task(coin["jsonl"][1], images)
    both = zip([*science.train, *science.test], [*shape.train, *shape.test], strict=True)
    for ours, theirs in both:
        assert ours.codes.tolist() == theirs.codes.tolist()
        assert ours.answer == {"a": "A", "b": "B"}[theirs.answer]
    text = load_coin_task(coin["folders"]["TextVQA"], images, coin["images"], scoring="vqa")
    assert text.scoring == "vqa" and text.test[0].answers == tuple(annotators("green", 8))
    assert all(s.options is None for s in [*text.train, *text.test])
    assert load_coin_task(coin["folders"]["TextVQA"], images, coin["images"]).scoring == "exact"


@pytest.mark.parametrize(
    ("rule", "credits"),
    [("vqa", [1.0, 1.0, 1.0, 1.0]), ("vqa-raw", [1.0, 0.6, 0.9, 1.0])],
)
def test_textvqa_credits_follow_the_vqa_evaluators_answer_processing(coin, rule, credits):
    """The reference answer scored against the ten annotators of each TextVQA-like test
    record: "The Red!" counts as "red" under `vqa` (CoIN's evaluator), not under `vqa-raw`."""
    images = ImageTokenizer(HOSTS["chameleon"](), 8, progress=False)
    text = load_coin_task(coin["folders"]["TextVQA"], images, coin["images"], scoring=rule)
    assert [s.answers.count(f"The {s.answer.title()}!") for s in text.test] == [2] * 4
    assert [credit(text, s, s.answer) for s in text.test] == pytest.approx(credits)


def test_a_conversation_gives_one_sample_per_answer(tmp_path, monkeypatch):
    turns = ["<image>\nwhat color ?", "red", "and the shape ?\nA. circle\nB. square", "B"]
    record = {
        "image": "images/0.png",
        "conversations": [
            {"from": ("human", "gpt")[k % 2], "value": value} for k, value in enumerate(turns)
        ],
    }
    plain = {"image": "images/1.png", "conversations": record["conversations"][2:]}  # no <image>
    test = [{"image": "images/1.png", "text": "<image> what color ?", "answer": "red"}]
    folder = write_coin(tmp_path / "json", {"Chat": {"train": [record, plain], "test": test}})
    rows = coin_rows(folder["Chat"])
    train_json = folder["Chat"] / "train.json"
    assert [(r.where, r.question, r.answer, r.options) for r in rows] == [
        (f"{train_json}: record 0 turn 1: ", "what color ?", "red", None),
        (
            f"{train_json}: record 0 turn 3: ",
            "what color ?\nred\nand the shape ?\nA. circle\nB. square",
            "B",
            ("circle", "square"),
        ),
        (
            f"{train_json}: record 1: ",
            "and the shape ?\nA. circle\nB. square",
            "B",
            ("circle", "square"),
        ),
        (f"{folder['Chat'] / 'test.json'}: record 0: ", "what color ?", "red", None),
    ]
    # Image paths start at the folder's parent unless an image root is given.
    assert rows[0].image == tmp_path / "json" / "images" / "0.png"
    assert coin_rows(folder["Chat"], tmp_path / "px")[3].image == tmp_path / "px/images/1.png"
    monkeypatch.chdir(folder["Chat"])  # named and placed as the folder, also when given as "."
    assert folder_name(".") == "Chat" and coin_rows(".")[0].image == rows[0].image


def test_jsonl_lines_carry_the_annotators_answers_for_the_vqa_rule(coin):
    lines = [
        {"image": "images/0.png", "question": "q", "answer": "red", "split": "train"},
        {"image": "images/1.png", "question": "q", "answer": "red", "split": "test"},
        {"image": "images/2.png", "question": "q", "answer": "red", "split": "test"},
    ]
    lines[1]["answers"] = ["red"] * 10
    path = coin["images"] / "vqa.jsonl"  # beside the images
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    check_task_file(path, "exact")
    with pytest.raises(TaskFileError, match=rf"{re.escape(str(path))}:3: field 'answers': the vqa"):
        check_task_file(path, "vqa")
    with pytest.raises(
        TaskFileError, match=rf"{re.escape(str(path))}:1: field 'options': the choice"
    ):
        check_task_file(path, "choice")  # a config's rule is checked before the model loads
    lines[2]["answers"] = ["red", "maroon"]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    check_task_file(path, "vqa")


# --- training ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", IMAGE_HOSTS)
def test_train_on_coin_folders_end_to_end(coin, tmp_path, capsys, family):
    out = tmp_path / "out"
    assert main(train_argv(coin, out, family=family)) == 0, capsys.readouterr().err[-2000:]
    results = read_results(out / "results.json")
    assert results.tasks == ["ScienceQA", "TextVQA"]
    assert results.scoring == {"ScienceQA": "choice", "TextVQA": "vqa"}
    entry = results.per_seed[0].methods["mode"]
    matrix, constrained = entry.accuracy_matrix, entry.constrained_accuracy_matrix
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    # Multiple choice has its options as a closed set; the open-ended task has none.
    assert all(row[0] is not None and 0 <= row[0] <= 1 and row[1] is None for row in constrained)
    # Each accuracy is the mean credit of the recorded answers under the task's rule.
    tasks = coin_records()
    for k, row in enumerate(matrix):
        stage = out / "checkpoints" / "seed0" / "mode" / f"stage{k + 1}" / "stage.json"
        given = json.loads(stage.read_text())["answers"]
        science = [
            score(a, r["answer"], "choice", options=("circle", "square"))
            for a, r in zip(given["ScienceQA"], tasks["ScienceQA"]["test"], strict=True)
        ]
        vqa = [
            score(a, r["answer"], "vqa", answers=r["answers"])
            for a, r in zip(given["TextVQA"], tasks["TextVQA"]["test"], strict=True)
        ]
        assert row == pytest.approx([sum(science) / 4, sum(vqa) / 4])
    run = json.loads((out / "run.json").read_text())
    hashed = {Path(f).relative_to(coin["root"]).as_posix() for f in run["hashes"]}
    assert hashed == {
        "Instructions/ScienceQA/train.json",
        "Instructions/ScienceQA/test.json",
        "Instructions/TextVQA/train.json",
        "Instructions/TextVQA/test.json",
        "cl_dataset/pairs.jsonl",
        "train.toml",
    }
    assert run["inputs"]["image_root"] == str(coin["images"])


# --- bad records: one clear error before the model loads -----------------------------------


def edit(name: str, split: str, index: int | None, value: object) -> Callable:
    """Replace record `index` of a task's split (None: the whole array) by `value`; a
    callable `value` edits a copy of the record (a dict) in place."""

    def apply(folders: dict[str, Path]) -> None:
        path = folders[name] / f"{split}.json"
        records = json.loads(path.read_text())
        if index is None:
            records = value
        elif callable(value):
            value(records[index])
        else:
            records[index] = value
        path.write_text(json.dumps(records))

    return apply


def raw(name: str, split: str, content: bytes) -> Callable:
    return lambda folders: (folders[name] / f"{split}.json").write_bytes(content)


def turns(*pairs: tuple[str, object]) -> Callable:
    return lambda r: r.update(conversations=[{"from": f, "value": v} for f, v in pairs])


# (name, edit of the copied folders, message regex); record 2 of train.json, 1 of test.json
BAD = [
    (
        "not UTF-8",
        raw("ScienceQA", "train", b'[{"image": "caf\xe9"}]'),
        r"train\.json:1: not UTF-8",
    ),
    ("invalid JSON", raw("TextVQA", "test", b'[{"image": '), r"test\.json:1: invalid JSON"),
    (
        "nested too deeply",
        raw("TextVQA", "train", b"[" * 100000 + b"]" * 100000),
        r"train\.json: JSON nested too deeply",
    ),
    (
        "not a JSON array",
        edit("ScienceQA", "train", None, {"data": []}),
        r"train\.json: expected a JSON array of records, got object",
    ),
    (
        "record not an object",
        edit("ScienceQA", "train", 2, ["images/2.png"]),
        r"train\.json: record 2: expected a JSON object, got array",
    ),
    (
        "missing image",
        edit("ScienceQA", "train", 2, lambda r: r.pop("image")),
        r"train\.json: record 2: field 'image': missing",
    ),
    (
        "image not a string",
        edit("ScienceQA", "train", 2, lambda r: r.update(image=3)),
        r"train\.json: record 2: field 'image': expected a non-empty string, got 3",
    ),
    (
        "unknown image file",
        edit("ScienceQA", "train", 2, lambda r: r.update(image="images/missing.png")),
        r"record 2: field 'image': image file not found: .*cl_dataset/images/missing\.png",
    ),
    (
        "missing conversations",
        edit("ScienceQA", "train", 2, lambda r: r.pop("conversations")),
        r"train\.json: record 2: field 'conversations': missing",
    ),
    (
        "empty conversations",
        edit("ScienceQA", "train", 2, lambda r: r.update(conversations=[])),
        r"record 2: field 'conversations': expected a non-empty array of turns, got \[\]",
    ),
    (
        "no gpt turn",
        edit("ScienceQA", "train", 2, turns(("human", SHAPE_QUESTION))),
        r"record 2: field 'conversations': no gpt turn answers turn 0",
    ),
    (
        "turns out of order",
        edit("ScienceQA", "train", 2, turns(("gpt", "B"), ("human", SHAPE_QUESTION))),
        r"record 2: field 'conversations': turn 0: expected from 'human', got 'gpt'",
    ),
    (
        "turn value not a string",
        edit("ScienceQA", "train", 2, turns(("human", SHAPE_QUESTION), ("gpt", 1))),
        r"record 2: field 'conversations': turn 1: expected an object with 'from' and a string",
    ),
    (
        "question only the placeholder",
        edit("ScienceQA", "train", 2, turns(("human", "<image>\n"), ("gpt", "B"))),
        r"record 2: field 'conversations': turn 0: no text beside the <image> placeholder",
    ),
    (
        "multiple choice without options",
        edit("ScienceQA", "train", 2, turns(("human", "which shape ?"), ("gpt", "B"))),
        r"train\.json: record 2: field 'conversations': the choice rule needs options",
    ),
    (
        "answer not an option",
        edit("ScienceQA", "train", 2, turns(("human", SHAPE_QUESTION), ("gpt", "E"))),
        r"record 2: field 'conversations': answer 'e' is neither an option letter",
    ),
    (
        "test answer not an option",
        edit("ScienceQA", "test", 1, lambda r: r.update(answer="octagon")),
        r"test\.json: record 1: field 'answer': answer 'octagon' is neither an option letter",
    ),
    (
        "test record without text",
        edit("TextVQA", "test", 1, lambda r: r.pop("text")),
        r"test\.json: record 1: field 'text': missing",
    ),
    (
        "answers not a list",
        edit("TextVQA", "test", 1, lambda r: r.update(answers="red")),
        r"test\.json: record 1: field 'answers': expected a non-empty list, got 'red'",
    ),
    (
        "answers not strings",
        edit("TextVQA", "test", 1, lambda r: r.update(answers=["red", 2])),
        r"test\.json: record 1: field 'answers': expected non-empty strings",
    ),
    (
        "vqa without the annotators' answers",
        edit("TextVQA", "test", 1, lambda r: r.pop("answers")),
        r"test\.json: record 1: field 'answers': the vqa rule needs every annotator's answer",
    ),
    (
        "a train id twice",
        edit("ScienceQA", "train", 3, lambda r: r.update(id="1")),
        r"train\.json: record 3: field 'id': '1' repeats, first at record 1$",
    ),
    (
        "a test question_id twice",
        edit("TextVQA", "test", 2, lambda r: r.update(question_id=8)),
        r"test\.json: record 2: field 'question_id': 8 repeats, first at record 0$",
    ),
    (
        "a key twice in a record",
        raw("TextVQA", "test", b'[{"image": "images/8.png", "text": "q", "text": "r"}]'),
        r"test\.json: record 0: key 'text' repeats in one object$",
    ),
    (
        "a key twice in a turn",
        raw(
            "ScienceQA",
            "train",
            b'[{"image": "images/0.png", "conversations": [{"from": "human", "from": "gpt"}]}]',
        ),
        r"train\.json: record 0: key 'from' repeats in one object$",
    ),
    (
        "an image path out of the image root",
        edit("ScienceQA", "train", 2, lambda r: r.update(image="images/../../2.png")),
        r"train\.json: record 2: field 'image': 'images/\.\./\.\./2\.png' leaves the image "
        r"root .*cl_dataset$",
    ),
    (
        "an absolute image path",
        edit("ScienceQA", "train", 2, lambda r: r.update(image="/etc/hostname")),
        r"train\.json: record 2: field 'image': '/etc/hostname' leaves the image root",
    ),
    ("no train records", edit("TextVQA", "train", None, []), r"TextVQA: no train samples"),
    (
        "folder without test.json",
        lambda folders: (folders["TextVQA"] / "test.json").unlink(),
        r"TextVQA: is a directory without test\.json; a CoIN task folder holds",
    ),
]


@pytest.mark.parametrize(("name", "apply", "message"), BAD, ids=[c[0] for c in BAD])
def test_bad_coin_records_are_one_clear_error_before_the_model_loads(
    coin, tmp_path, capsys, name, apply, message
):
    folders = {n: tmp_path / "Instructions" / n for n in coin["folders"]}
    for n, folder in folders.items():
        shutil.copytree(coin["folders"][n], folder)
    apply(folders)
    out = tmp_path / "out"
    assert main(train_argv(coin, out, folders)) == 2
    err = capsys.readouterr().err
    assert err.startswith("modecl: error: ") and err.count("\n") == 1, err[-2000:]
    assert re.search(message, err), err[-2000:]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), r"record 0: field 'image': image file not found: .*Instructions/images/0\.png"),
        (("--image-root", "nowhere"), r"--image-root nowhere: not a folder"),
    ],
)
def test_the_image_root_is_checked_before_the_model_loads(coin, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(train_argv(coin, out, extra=extra)) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_an_image_root_needs_a_coin_folder(coin, tmp_path, capsys):
    argv = ["train", "--model", str(coin["hosts"]["chameleon"]), "--tasks", str(coin["jsonl"][0])]
    argv += ["--method", "seq-lora", "--image-root", str(coin["images"])]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "--image-root is for CoIN task folders" in capsys.readouterr().err


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from(["", "<image>", "x", "A. a"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["image", "conversations", "from", "value", "text", "answer", "answers"]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@seed(0)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(JSON, JSON)
def test_any_json_reads_as_coin_records_or_raises_the_task_file_error(
    tmp_path_factory, train, test
):
    folder = tmp_path_factory.mktemp("coin") / "Task"
    write_coin(folder.parent, {"Task": {"train": train, "test": test}})
    try:
        coin_rows(folder)
    except TaskFileError as err:
        assert str(err).startswith(str(folder))
