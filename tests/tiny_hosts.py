"""Tiny random-weight Chameleon / Emu3 checkpoints on disk, with a word-level tokenizer and
JSONL tasks of small PNG files: what `modecl train` reads from a real checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from tests.test_hf_host import HOSTS

# Text ids 3..: the words of the tasks below ("4 * 4" is Emu3's size text of a 4x4 image).
WORDS = ["what", "color", "is", "it", "?", "red", "blue", "green", "which", "shape", "(", "a"]
WORDS += [")", "b", "circle", "square", "draw", "4", "*"]
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: 3 + i for i, w in enumerate(WORDS)}}
    vocab["<unk>"] = len(vocab)
    model = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def write_host(family: str, folder: Path) -> Path:
    """A tiny `family` checkpoint (model + tokenizer) saved with `save_pretrained`."""
    HOSTS[family]().save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def _png(folder: Path, name: str, color: str, square: bool) -> str:
    image = Image.new("RGB", (8, 8), (0, 0, 0))
    box = (1, 1, 7, 7) if square else (3, 1, 5, 7)
    image.paste(COLORS[color], box)
    image.save(folder / "images" / name)
    return f"images/{name}"


def write_tasks(folder: Path) -> tuple[list[Path], Path]:
    """Two task files (color: exact match; shape: multiple choice) and a pairs file."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    color, shape, pairs = [], [], []
    for i in range(12):
        name, square = list(COLORS)[i % 3], i % 2 == 0
        image = _png(folder, f"{i}.png", name, square)
        split = "test" if i >= 8 else "train"
        color.append({"image": image, "question": "what color is it ?", "answer": name})
        shape.append(
            {
                "image": image,
                "question": "which shape ? ( a ) circle ( b ) square",
                "answer": "b" if square else "a",
                "options": ["circle", "square"],
            }
        )
        pairs.append({"caption": f"draw {name}", "image": image, "split": split})
        for row in (color[-1], shape[-1]):
            row["split"] = split
    files = []
    for task, rows in (("color", color), ("shape", shape)):
        files.append(folder / f"{task}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return files, folder / "pairs.jsonl"
