"""`modecl train --concepts`: the concepts file, and drawings of every concept prompt scored
by CLIP on the tiny hosts (`tests.fixtures.write_concepts`, `write_tiny_clip`)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch.nn.functional as F

from modecl.cli import main
from modecl.core.files import read_image
from modecl.core.results import read_results
from modecl.core.tasks import TaskFileError
from modecl.hosts.clip import load_clip
from modecl.hosts.concepts import check_concepts_file, load_concepts
from modecl.hosts.tasks import ImageTokenizer, load_pairs
from tests.fixtures import (
    HOSTS,
    train_command,
    train_inputs,
    write_concepts,
    write_host,
    write_jsonl,
)

CONCEPTS = {"red": ["draw red", "red circle"], "blue": ["draw blue", "blue square"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    inputs = train_inputs(tmp_path_factory.mktemp("concepts"))
    return inputs | {"concepts": write_concepts(inputs["root"] / "data")}


def train(setup, family, out, *extra):
    host = setup["root"] / family
    if not host.exists():
        write_host(family, host)
    return train_command(setup, host, "seq-lora", out, "--concepts", str(setup["concepts"]), *extra)


# --- the concepts file --------------------------------------------------------------------


def write(tmp_path, *rows):
    return write_jsonl(tmp_path / "concepts.jsonl", *rows)


GOOD = {"concept": "red", "prompts": ["draw red"], "images": "concepts/red"}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({**GOOD, "concept": "red"}, "field 'concept': 'red' repeats, first at"),
        ({**GOOD, "concept": "../up"}, "field 'concept': '../up' is not a name"),
        ({**GOOD, "concept": ""}, "field 'concept': expected a non-empty string"),
        ({**GOOD, "concept": "x", "prompts": []}, "field 'prompts': expected a non-empty list"),
        ({**GOOD, "concept": "x", "prompts": "draw"}, "field 'prompts': expected a non-empty list"),
        ({**GOOD, "concept": "x", "prompts": ["a", " "]}, "field 'prompts': expected non-empty"),
        ({**GOOD, "concept": "x", "images": 3}, "field 'images': expected a folder"),
        ({**GOOD, "concept": "x", "images": "nowhere"}, "field 'images': folder not found"),
        ({**GOOD, "concept": "x", "images": "concepts.jsonl"}, "field 'images': folder not found"),
        ({**GOOD, "concept": "x", "images": "empty"}, "field 'images': no image files (.png"),
        ({"concept": "x", "prompts": ["a"]}, "field 'images': missing"),
        ({**GOOD, "concept": "x", "seed": 1}, "field 'seed': unknown field"),
        ("[1]", "expected a JSON object"),
    ],
)
def test_concepts_file_errors_name_file_line_and_field(tmp_path, row, message):
    write_concepts(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    path = write(tmp_path, GOOD, row)
    with pytest.raises(TaskFileError) as error:
        check_concepts_file(path)
    assert str(error.value).startswith(f"{path}:2: ")
    assert message in str(error.value)


def test_a_bad_concepts_file_stops_the_run_before_the_host_loads(setup, tmp_path, capsys):
    bad = write(tmp_path, {**GOOD, "images": "nowhere"})
    argv = ["train", "--model", str(tmp_path / "no-host"), "--tasks", str(setup["files"][0])]
    argv += ["--method", "seq-lora", "--out", str(tmp_path / "out"), "--concepts", str(bad)]
    assert main(argv) == 2
    assert f"{bad}:1: field 'images': folder not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_load_concepts_reads_prompts_images_and_the_first_image_tokens(tmp_path):
    path = write_concepts(tmp_path)
    red = tmp_path / "concepts" / "red"
    (red / "notes.txt").write_text("not an image")
    (red / "sub").mkdir()
    shutil.copy(red / "0.png", red / "sub" / "0.png")  # subfolders are not read
    shutil.copy(red / "0.png", red / "3.PNG")
    model = HOSTS["emu3"]()
    concepts = load_concepts(path, ImageTokenizer(model, 8))
    assert [c.name for c in concepts] == ["red", "blue"]
    assert [list(c.prompts) for c in concepts] == list(CONCEPTS.values())
    assert [p.name for p in concepts[0].images] == ["0.png", "1.png", "2.png", "3.PNG"]
    first = ImageTokenizer(model, 8)([(concepts[1].images[0], "")])[0]
    assert concepts[1].codes.tolist() == first.tolist()
    assert len(first) == 4 * 5  # 4 rows of 4 codes + row end
    assert concepts[1].source == f"{path}:2"
    with pytest.raises(TaskFileError, match="no concepts"):
        check_concepts_file(write(tmp_path, ""))


def test_a_prompt_longer_than_the_context_is_refused_before_training(setup, tmp_path, capsys):
    long = write(tmp_path, {**GOOD, "images": str(setup["concepts"].parent / "concepts" / "red")})
    long.write_text(long.read_text().replace('"draw red"', '"' + "red " * 5000 + '"'))
    host = write_host("chameleon", tmp_path / "host")
    argv = ["train", "--model", str(host), "--tasks", *map(str, setup["files"])]
    argv += ["--method", "seq-lora", "--out", str(tmp_path / "out"), "--concepts", str(long)]
    assert main([*argv, "--config", str(setup["config"])]) == 2
    assert f"{long}:1: prompt 'red red" in capsys.readouterr().err
    assert not (tmp_path / "out" / "checkpoints").exists()


# --- the evaluation -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def emu3_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("emu3-run")
    assert train(setup, "emu3", out) == 0
    return out


def by_hand(clip, drawn, references, groups, reference_groups):
    """The paper's rule and the per-concept rule, from the CLIP embeddings of the files."""
    x = clip.images([read_image(f) for f in drawn])
    y = clip.images([read_image(f) for f in references])
    cosines = x @ y.T
    own = [
        float(row[[g == h for h in reference_groups]].mean())
        for row, g in zip(cosines, groups, strict=True)
    ]
    return x, float(cosines.mean()), own


def test_concepts_are_drawn_and_scored_after_every_task(setup, emu3_run):
    out = emu3_run
    seed = read_results(out / "results.json").per_seed[0]
    clip = load_clip(setup["clip"])
    data = setup["concepts"].parent / "concepts"
    references = [data / c / f"{i}.png" for c in CONCEPTS for i in range(3)]
    reference_groups = [c for c in CONCEPTS for _ in range(3)]
    folders = ["pretrained", "seq-lora/stage1", "seq-lora/stage2"]
    stages = [seed.pretrained, *seed.methods["seq-lora"].stages]
    for stage, name in zip(stages, folders, strict=True):
        m, folder = stage.measures, out / "images" / "seed0" / name / "concepts"
        entry, scores = m["concepts_generation"], m["concepts_generation"]["clip"]
        assert entry["drawn"] == 8 and entry["folder"] == str(folder)
        # eval.draws = 2 images per prompt, per concept
        drawn = [folder / c / f"{j}-{d}.png" for c in CONCEPTS for j in range(2) for d in range(2)]
        assert sorted(folder.rglob("*.png")) == sorted(drawn)
        groups = [c for c in CONCEPTS for _ in range(4)]
        x, everyone, own = by_hand(clip, drawn, references, groups, reference_groups)
        assert scores["status"] == "ok"
        assert scores["image_alignment_all"] == pytest.approx(everyone, abs=1e-5)
        assert scores["image_alignment_own"] == pytest.approx(sum(own) / 8, abs=1e-5)
        assert scores["per_concept"] == pytest.approx(
            {"red": sum(own[:4]) / 4, "blue": sum(own[4:]) / 4}, abs=1e-5
        )
        prompts = [p for c in CONCEPTS for p in CONCEPTS[c] for _ in range(2)]
        text = float(F.cosine_similarity(x, clip.texts(prompts)).mean())
        assert scores["text_alignment"] == pytest.approx(text, abs=1e-5)
        assert all(-1 <= scores[k] <= 1 for k in ("image_alignment_all", "text_alignment"))
        assert scores["kid_subset_size"] == 6  # the 6 reference images, fewer than 8 drawings
        assert math.isfinite(scores["kid"]) and scores["kid_std"] >= 0
        assert math.isfinite(scores["fd"]) and scores["fd"] >= -1e-6
        assert not scores["fd_reliable"]
        assert scores["note"] == (
            "FD unreliable: 8 drawings and 6 reference images for 16 feature dimensions; read KID"
        )
        for key, field in [("clip_image_all", "image_alignment_all"), ("kid", "kid")]:
            assert m[f"concepts_{key}"] == scores[field]
        # The test pairs: each drawing against every test image, and against its own.
        pairs = m["pairs_generation"]
        test_images = load_pairs(setup["pairs"], ImageTokenizer(HOSTS["emu3"](), 8)).test_images
        own_groups, all_groups = ["0", "1"], [str(i) for i in range(len(test_images))]
        files = pairs["images"]
        _, everyone, own = by_hand(clip, files, test_images, own_groups, all_groups)
        assert m["pairs_clip_image_all"] == pytest.approx(everyone, abs=1e-5)
        assert m["pairs_clip_image_own"] == pytest.approx(sum(own) / 2, abs=1e-5)
        assert pairs["clip"]["kid_subset_size"] == 2 and math.isfinite(m["pairs_kid"])
        assert "per_concept" not in pairs["clip"]
    assert stages[1].measures["concepts_kid"] != stages[0].measures["concepts_kid"]


def test_the_report_has_a_table_per_stage_and_the_fd_note(emu3_run):
    report = (emu3_run / "report.md").read_text()
    section = report[report.index("## Image generation") :]
    assert "read KID first" in section and "the paper's" in section
    head = "| method | after | drawn | CLIP-I all | CLIP-I own | CLIP-T | KID | FD | note |"
    concepts = section[section.index(head) :].split("\n\n")[0].splitlines()
    seed = read_results(emu3_run / "results.json").per_seed[0]
    stages = [("pre-trained", seed.pretrained)]
    stages += [("seq-lora", s) for s in seed.methods["seq-lora"].stages]
    assert len(concepts) == 2 + len(stages)
    for row, (name, stage) in zip(concepts[2:], stages, strict=True):
        clip = stage.measures["concepts_generation"]["clip"]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:3] == [name, stage.task, "8"]
        assert cells[3] == f"{clip['image_alignment_all']:.3f}"
        assert cells[6] == f"{clip['kid']:.4f} ± {clip['kid_std']:.4f}"
        assert cells[8].startswith("FD unreliable: 8 drawings")
    per_concept = section[section.index("| concept | pre-trained | seq-lora |") :].splitlines()
    first = seed.pretrained.measures["concepts_generation"]["clip"]["per_concept"]
    last = seed.methods["seq-lora"].stages[-1].measures["concepts_generation"]["clip"]
    for row, name in zip(per_concept[2:4], CONCEPTS, strict=True):
        assert row == f"| {name} | {first[name]:.3f} | {last['per_concept'][name]:.3f} |"
    assert "### Test pairs" in section
    headline = report[: report.index("## ")]
    assert "| concepts CLIP-I | concepts CLIP-T | concepts KID |" in headline


def test_without_a_decoder_the_concepts_are_drawn_not_scored(setup, tmp_path):
    assert train(setup, "chameleon", tmp_path) == 0
    seed = read_results(tmp_path / "results.json").per_seed[0]
    for stage in [seed.pretrained, *seed.methods["seq-lora"].stages]:
        entry = stage.measures["concepts_generation"]
        assert entry["drawn"] == 8 and "folder" not in entry
        assert entry["clip"]["status"] == "unavailable" and "decoder" in entry["clip"]["reason"]
        assert stage.measures["concepts_clip_image_all"] is None
    assert not list((tmp_path / "images").rglob("*.png"))


def test_an_unreadable_reference_image_is_named(setup, tmp_path, capsys):
    concepts = write_concepts(tmp_path)
    (tmp_path / "concepts" / "blue" / "2.png").write_bytes(b"not a PNG")
    assert train({**setup, "concepts": concepts}, "emu3", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert f"cannot read image {tmp_path / 'concepts' / 'blue' / '2.png'}" in error


def test_the_concepts_file_is_part_of_the_run_key(setup, emu3_run, tmp_path, capsys):
    shutil.copytree(emu3_run, tmp_path / "run")
    before = setup["concepts"].read_text()
    setup["concepts"].write_text(before.replace("red circle", "red square"))
    try:
        assert train(setup, "emu3", tmp_path / "run") == 2
    finally:
        setup["concepts"].write_text(before)
    assert f"have changed since it started: {setup['concepts']}" in capsys.readouterr().err
