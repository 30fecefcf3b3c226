"""User tasks from JSONL files: a good file loads by value, each bad line names file/line/field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modecl.core.tasks import TaskFileError
from modecl.digits.taskfile import load_task_file

EXAMPLE = Path(__file__).parents[1] / "configs" / "tasks" / "example-parity-jsonl.jsonl"
Q = "is this digit even or odd"


def line(**fields: object) -> str:
    record = {"image": 3, "question": Q, "answer": "odd", "split": "train"} | fields
    return json.dumps({k: v for k, v in record.items() if v is not ...})


def write(tmp_path: Path, lines: list[str], name: str = "user.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def write_png(path: Path, pixels: np.ndarray, scale: int = 1) -> None:
    """Digits pixels (0..16, ink high) as an 8-bit PNG, each pixel a scale x scale block."""
    img = Image.fromarray(np.rint(pixels * 255 / 16).astype(np.uint8))
    img.resize((8 * scale, 8 * scale), Image.Resampling.NEAREST).save(path)


def test_example_file_loads_by_value(digits):
    task = load_task_file(EXAMPLE, digits)
    assert task.name == "example-parity-jsonl"
    assert (len(task.train), len(task.test)) == (12, 8)
    assert task.answers == ("even", "odd")
    records = [json.loads(s) for s in EXAMPLE.read_text().splitlines()]
    index = np.array([r["image"] for r in records])
    codes = digits.codebook.encode(digits.pools.images[index])
    samples = [*task.train, *task.test]
    assert [s.index for s in samples] == index.tolist()
    assert [list(s.codes) for s in samples] == codes.tolist()
    labels = digits.pools.labels[index]
    assert [s.answer for s in samples] == ["odd" if y % 2 else "even" for y in labels]
    assert set(index[:12]) <= set(digits.pools.train) and set(index[12:]) <= set(digits.pools.test)
    assert all(s.question == Q and s.label is None for s in samples)


def test_png_paths_and_code_lists_match_the_index(digits, tmp_path):
    index = [3, 10, 42]
    (tmp_path / "img").mkdir()
    for i in index:
        write_png(tmp_path / "img" / f"{i}.png", digits.pools.images[i])
        write_png(tmp_path / "img" / f"{i}-32.png", digits.pools.images[i], scale=4)
    codes = digits.codebook.encode(digits.pools.images[index]).tolist()
    lines = [line(image=i) for i in index]
    lines += [line(image=f"img/{i}.png") for i in index]  # relative to the JSONL's folder
    lines += [line(image=f"img/{i}-32.png") for i in index]
    lines += ["", "  "]  # blank lines are skipped
    lines += [line(image=c, split="test", answer="  EVEN ", question="Is this  digit EVEN or odd")
              for c in codes]  # fmt: skip
    task = load_task_file(write(tmp_path, lines), digits, name="mine")
    assert task.name == "mine" and task.answers == ("even", "odd")
    assert [list(s.codes) for s in task.train] == codes * 3
    assert [s.index for s in task.train] == [*index, *[None] * 6]
    assert [list(s.codes) for s in task.test] == codes
    assert {(s.question, s.answer, s.index) for s in task.test} == {(Q, "even", None)}


def test_png_is_read_as_bright_ink_on_dark(digits, tmp_path):
    pixels = digits.pools.images[7]
    write_png(tmp_path / "inverted.png", 16 - pixels)
    path = write(tmp_path, [line(image="inverted.png"), line(split="test")])
    got = load_task_file(path, digits).train[0].codes
    assert list(got) == digits.codebook.encode((16 - pixels)[None])[0].tolist()
    assert list(got) != digits.codebook.encode(pixels[None])[0].tolist()


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (line(quesiton="x"), "field 'quesiton': unknown field"),
    (line(answer=...), "field 'answer': missing"),
    (line(image=...), "field 'image': missing"),
    (line(question=7), "field 'question': expected a non-empty string, got 7"),
    (line(answer="  "), "field 'answer': expected a non-empty string"),
    (line(split="dev"), 'field \'split\': expected "train" or "test", got "dev"'),
    (line(question="is this digit purple"), "field 'question': word 'purple' is not in the host"),
    (line(answer="maybe"), "field 'answer': word 'maybe' is not in the host model's vocabulary"),
    (line(image=1797), "field 'image': index 1797 is out of range 0..1796"),
    (line(image=-1), "field 'image': index -1 is out of range"),
    (line(image=True), "field 'image': expected a digits index, an image path or a list"),
    (line(image=2.0), "field 'image': expected a digits index, an image path or a list"),
    (line(image="nope.png"), "field 'image': image file not found: "),
    (line(image="junk.png"), "field 'image': cannot read image "),
    (line(image=[0] * 15), "field 'image': expected 16 codes, got 15"),
    (line(image=[0] * 15 + [16]), "field 'image': code 16 is not an int in 0..15"),
    (line(image=[0] * 15 + ["1"]), "field 'image': code '1' is not an int"),
    (line()[:-1] + ', "answer": "even"}', "key 'answer' repeats in one object"),
]


@pytest.mark.parametrize(("bad", "fragment"), BAD_LINES)
def test_a_bad_line_names_file_line_and_field(digits, tmp_path, bad, fragment):
    (tmp_path / "junk.png").write_bytes(b"not a png")
    path = write(tmp_path, [line(), "", line(split="test"), bad])
    with pytest.raises(TaskFileError) as err:
        load_task_file(path, digits)
    assert str(err.value).startswith(f"{path}:4: ")
    assert fragment in str(err.value)


def test_unknown_word_error_tells_how_to_list_the_words(digits, tmp_path):
    path = write(tmp_path, [line(question="is this digit even or odd colour"), line(split="test")])
    with pytest.raises(TaskFileError, match=r"'colour'.*pre-trained on \(listed by digits.vocab"):
        load_task_file(path, digits)


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_file_without_a_split_is_an_error(digits, tmp_path, split):
    other = "test" if split == "train" else "train"
    path = write(tmp_path, [line(split=other)])
    with pytest.raises(TaskFileError, match=rf"^{re.escape(str(path))}: no {split} samples$"):
        load_task_file(path, digits)
