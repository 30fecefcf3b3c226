"""User tasks on a transformers early-fusion host (Chameleon / Anole, Emu3): JSONL files.

A task file holds one sample per line (blank lines skipped)::

    {"image": "img/0001.png", "question": "What color is it?", "answer": "red",
     "split": "train"}
    {"image": "img/0002.png", "question": "Which shape? (a) circle (b) square",
     "answer": "b", "options": ["circle", "square"], "split": "test", "scoring": "choice"}

`image` is a path relative to the file's folder. `options` (multiple choice) are only used
to score: write them into the question as the model should see them. `answers` (optional)
holds every annotator's answer, for the `vqa` rule, which needs it on every test line.
`scoring` is a rule of :mod:`modecl.core.scoring`, the same on every line; without it a task
scores `choice` when it has options, else `exact`. CoIN's task folders are read by
:mod:`modecl.hosts.coin` into the same rows (:class:`Row`) and tasks. A distillation /
generation file holds (caption, image) pairs::

    {"caption": "a red circle", "image": "img/0003.png", "split": "train"}

`split` is optional there: `train` pairs (the default) feed the distillation stream,
`test` pairs the image-generation evaluation. Images become codes through the host's own VQ
tokenizer (:func:`modecl.hosts.host.image_tokens`), each image file once. Reading is
all-or-nothing: a bad line raises :class:`~modecl.core.tasks.TaskFileError` naming the file, the
line and the field, and nothing is returned.
"""

from __future__ import annotations

import hashlib
import json
import os
import reprlib
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from modecl.core.modality import HOST_FAMILIES, image_mask, image_token_ids
from modecl.core.processes import ONE_PROCESS, Processes
from modecl.core.scoring import RULES, score
from modecl.core.sequences import IGNORE, DrawPair, Example
from modecl.core.tasks import (
    Packed,
    Sample,
    Samples,
    Task,
    TaskFileError,
    pack_fields,
    read_jsonl,
)
from modecl.hosts.host import (
    ImageVocabulary,
    bos_ids,
    image_grid,
    image_span,
    image_tokens,
    image_vocabulary,
    load_image,
    span_length,
)
from modecl.hosts.token_cache import SEGMENT_IMAGES, Rows, TokenStore

CHUNK = 4096  # texts encoded at once when counting tokens

__all__ = [
    "HostFormat",
    "ImageTokenizer",
    "Pairs",
    "Row",
    "TaskTable",
    "check_images",
    "check_pairs_file",
    "check_rows",
    "check_task_file",
    "load_image_task",
    "load_pairs",
    "rows_task",
    "table_task",
    "text_list",
    "token_source",
]


@dataclass(frozen=True)
class HostFormat:
    """The token format of a Chameleon / Emu3 host (:class:`modecl.core.sequences.Format`)::

    understand  BOS <image span> question | answer EOS
    draw        BOS caption <span head>   | codes and span markers EOS

    A sample's `codes` (a pair's too) are one row of `image_tokens`: vocabulary ids.
    """

    vocab: ImageVocabulary
    modality_ids: tuple[int, ...]
    bos: tuple[int, ...]
    eos_id: int
    pad_id: int
    encode: Callable[[str], Sequence[int]]
    decode_text: Callable[[Sequence[int]], str]
    count_tokens: Callable[[list[str]], list[int]] | None = None  # texts -> ids each

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any) -> HostFormat:
        """Read the ids from `model`'s config; text goes through `tokenizer` (transformers)."""
        text = model.config.get_text_config()
        eos = text.eos_token_id if text.eos_token_id is not None else tokenizer.eos_token_id
        pad = text.pad_token_id if text.pad_token_id is not None else tokenizer.pad_token_id
        if eos is None:
            raise ValueError("the host defines no end-of-sequence token (eos_token_id)")
        return cls(
            vocab=image_vocabulary(model),
            modality_ids=tuple(image_token_ids(model.config)),
            bos=tuple(bos_ids(model)),
            eos_id=int(eos),
            pad_id=int(eos if pad is None else pad),
            encode=lambda s: tokenizer(s, add_special_tokens=False)["input_ids"],
            decode_text=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            count_tokens=_token_counter(tokenizer),
        )

    def lengths(self, samples: Sequence[Sample]) -> np.ndarray:
        """The token count of each sample's understand example (prompt and answer), counted
        without building it: a Chameleon span from the number of codes (a table's codes'
        ``lengths()``, such as a token store's index: no codes touched), the texts encoded
        in batches."""
        table = isinstance(samples, Samples) and hasattr(samples.codes, "lengths")
        if table and self.vocab.family != "emu3":
            spans = samples.codes.lengths() + span_length(self.vocab, (1, 0), self.encode)
        else:
            grids = (image_grid(self.vocab, s.codes) for s in samples)
            spans = np.array([span_length(self.vocab, g, self.encode) for g in grids], dtype=int)
        texts = np.zeros(len(samples), dtype=np.int64)
        for name in ("question", "answer"):
            column = samples.columns[name] if table else [getattr(s, name) for s in samples]
            for start in range(0, len(samples), CHUNK):
                part = column[start : start + CHUNK]
                counted: dict[str, int] = {}  # each text of the chunk encoded once
                new = list(dict.fromkeys(part))  # ImageNet asks one question of every image
                count = self.count_tokens or (lambda texts: [len(self.encode(t)) for t in texts])
                counted.update(zip(new, count(new), strict=True))
                texts[start : start + len(part)] += [counted[t] for t in part]
        return spans + texts + len(self.bos) + 1  # BOS, and the answer's EOS

    def prompt(self, sample: Sample) -> list[int]:
        head, rest = image_span(self.vocab, sample.codes, self.encode)
        return [*self.bos, *head, *rest, *self.encode(sample.question)]

    def answer_ids(self, answer: str) -> list[int]:
        return [*self.encode(answer), self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        ids = ids[: ids.index(self.eos_id)] if self.eos_id in ids else ids
        return self.decode_text(ids).strip()

    def answer_allowed(self, vocab_size: int) -> torch.Tensor | None:
        """No image code where the host's own forward masks them (Chameleon's)."""
        if not HOST_FAMILIES[self.vocab.family].forward_masks_codes:
            return None
        return ~self.is_image_code(torch.arange(vocab_size))

    def draw_prompt(self, pair: DrawPair) -> list[int]:
        return self._draw_parts(pair)[0]

    def draw_example(self, pair: DrawPair) -> Example:
        prompt, target = self._draw_parts(pair)
        return Example(prompt + target, [IGNORE] * len(prompt) + target)

    def _draw_parts(self, pair: DrawPair) -> tuple[list[int], list[int]]:
        """(caption and the span's head, the rest of the span and EOS): one span check."""
        head, rest = image_span(self.vocab, pair.codes, self.encode)
        return [*self.bos, *self.encode(pair.prompt), *head], [*rest, self.eos_id]

    def is_image_code(self, ids: torch.Tensor) -> torch.Tensor:
        return image_mask(ids, self.vocab.codes)

    def is_image_token(self, ids: torch.Tensor) -> torch.Tensor:
        return image_mask(ids, self.modality_ids)


def _token_counter(tokenizer: Any) -> Callable[[list[str]], list[int]]:
    """Texts -> how many ids `tokenizer(text, add_special_tokens=False)` gives each: a fast
    tokenizer's own batch encoder, without transformers' per-text wrapping."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda texts: [
            len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]
        ]
    return lambda texts: [len(e) for e in backend.encode_batch(texts, add_special_tokens=False)]


def token_source(model_path: str, size_or_processor: Any) -> str:
    """The digest that marks a token store's codes as this host's at this image sizing
    (:mod:`~modecl.hosts.token_cache`): the checkpoint's path and the size or processor."""
    size = size_or_processor
    sizing = size.to_json_string() if hasattr(size, "to_json_string") else json.dumps(size)
    return hashlib.sha256(json.dumps([model_path, sizing]).encode()).hexdigest()


@dataclass
class ImageTokenizer:
    """Image files -> the host's image tokens, each file tokenized once.

    `size_or_processor`: an int / (h, w) to resize to (the tiny test models), or the host's
    image processor (a real checkpoint's `AutoImageProcessor`). The tokens live in the
    memory-mapped :class:`~modecl.hosts.token_cache.TokenStore` at `folder` (a run's
    ``image_tokens/``, kept across runs), which refuses tokens of another host or image
    sizing; a call returns them as views into it (:class:`~modecl.hosts.token_cache.Rows`).
    Tokens of new files wait in a staging store in ``$TMPDIR`` (one per process, named by
    `folder` and the host) until :meth:`commit` moves them into `folder`: a run commits
    once every input passed its checks, so a refused input leaves nothing in the out dir,
    and a killed tokenization resumes from the staged segments (``segment_images`` images
    each) without tokenizing them again. Without `folder`, they stay in a temporary store.
    New files are read and tokenized `batch_size` at a time: under several `processes`
    (the run's) each tokenizes its share, and every process stages every round's tokens.
    """

    model: nn.Module
    size_or_processor: Any
    batch_size: int = 16
    progress: bool = True
    folder: Path | None = None
    segment_images: int = SEGMENT_IMAGES
    processes: Processes = ONE_PROCESS
    store: TokenStore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._source = token_source(getattr(self.model, "name_or_path", ""), self.size_or_processor)
        self.store = TokenStore(self.folder or self._temporary(), source=self._source)
        self.staged = self.store
        if self.folder is not None:
            self.staged = TokenStore(self._staging(), self._source, self.segment_images)

    def _temporary(self) -> Path:
        self._tmp = tempfile.TemporaryDirectory(prefix="modecl-tokens-")
        return Path(self._tmp.name)

    def _staging(self) -> Path:
        """This process's staging store: the same folder for the same out dir and host."""
        key = hashlib.sha256(json.dumps([os.path.abspath(self.folder), self._source]).encode())
        name = f"modecl-tokens-{key.hexdigest()[:16]}-{self.processes.rank}"
        return Path(tempfile.gettempdir()) / name

    def rows(self, names: Sequence[str]) -> tuple[Rows, np.ndarray]:
        """The codes of `names` in the store or the staging store, and a mask of those found."""
        rows, found = self.store.rows(names)
        if self.staged is self.store or found.all():
            return rows, found
        more, also = self.staged.rows(names)
        offset = len(rows.segments)
        which = np.where(found, rows.which, more.which + offset)
        index = np.where(found, rows.index, more.index)
        return Rows([*rows.segments, *more.segments], which, index), found | also

    def __call__(self, files: Sequence[tuple[Path, str]]) -> Rows:
        """Tokens of each `(file, where)`; `where` prefixes the error of a bad file."""
        return self.rows_of([str(file) for file, _ in files], lambda i: files[i][1])

    def rows_of(self, names: Sequence[str], where: Callable[[int], str]) -> Rows:
        """Tokens of each file of `names` (paths, or packed: :class:`Packed`); `where(i)`
        prefixes the error of a bad file `names[i]`."""
        _, found = self.rows(names)
        todo: dict[str, str] = {}
        for i in np.flatnonzero(~found):
            todo.setdefault(names[i], where(i))
        processes, have = self.processes, set()
        if processes.count > 1:  # after a kill, processes may have staged unequal parts
            most = int(np.argmax(processes.gather([len(todo)])))
            todo = processes.broadcast(todo, most)
            have = {n for n, ok in zip(todo, self.rows(list(todo))[1], strict=True) if ok}
        for name, where in todo.items():  # every file checked before any work
            if not Path(name).is_file():
                raise TaskFileError(f"{where}image file not found: {name}")
        if todo:
            tokens = self._tokenized(todo)
            self.staged.write((n, c) for n, c in tokens if n not in have)
        return self.rows(names)[0]

    def commit(self) -> None:
        """Move the tokens read so far into the store at `folder` (every process calls it)."""
        if self.staged is self.store:
            return
        if self.processes.main:
            self.store.take_segments(self.staged.folder)
        self.processes.barrier()
        shutil.rmtree(self.staged.folder, ignore_errors=True)  # rows read stay mapped
        self.staged = TokenStore(self.staged.folder, self._source, self.segment_images)
        self.store.refresh()

    def _tokenized(self, todo: dict[str, str]) -> Iterator[tuple[str, np.ndarray]]:
        """`(file, tokens)` of every file of `todo`: in each round, every process tokenizes
        one batch of its share, and all gather the round's batches."""
        share = self.processes.share(list(todo))
        rounds = range(0, -(-len(todo) // self.processes.count), self.batch_size)
        with tqdm(total=len(share), desc="tokenizing images", disable=not self.progress) as bar:
            for start in rounds:
                names, tokens, error = share[start : start + self.batch_size], {}, None
                try:
                    tokens = self._tokenize(names, todo)
                except TaskFileError as err:  # every process must reach the gather below
                    error = str(err)
                for part, part_error in self.processes.gather([(tokens, error)]):
                    if part_error is not None:
                        raise TaskFileError(part_error)
                    yield from part.items()
                bar.update(len(names))

    def _tokenize(self, names: list[str], where: dict[str, str]) -> dict[str, np.ndarray]:
        pixels = {}
        for name in names:
            try:
                pixels[name] = load_image(name, self.size_or_processor)
            except (OSError, ValueError) as err:
                raise TaskFileError(f"{where[name]}{err}") from None
        by_shape: dict[tuple[int, ...], list[str]] = defaultdict(list)
        for name, value in pixels.items():  # a batch holds images of one shape only
            by_shape[tuple(value.shape)].append(name)
        out = {}
        for group in by_shape.values():
            tokens = image_tokens(self.model, torch.cat([pixels[n] for n in group]))
            out |= dict(zip(group, tokens.cpu().numpy(), strict=True))
        return out


def _split(record: dict, where: str, default: str | None = None) -> str:
    split = record.get("split", default)
    if split not in ("train", "test"):
        raise TaskFileError(f'{where}field \'split\': expected "train" or "test", got {split!r}')
    return split


def text_list(value: Any, where: str, name: str) -> tuple[str, ...]:
    """A field holding a non-empty list of non-empty strings, as a tuple."""
    if not isinstance(value, list) or not value:
        raise TaskFileError(
            f"{where}field '{name}': expected a non-empty list, got {reprlib.repr(value)}"
        )
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise TaskFileError(
            f"{where}field '{name}': expected non-empty strings, got {reprlib.repr(value)}"
        )
    return tuple(value)


@dataclass(frozen=True)
class Row:
    """One checked sample of a task file or folder, its image not tokenized yet.

    `where` prefixes every message about it ("file:line: ", "file: record N: ");
    `answer_field` and `options_field` name the fields its answer and options came from.
    """

    where: str
    image: Path
    split: str
    question: str
    answer: str
    options: tuple[str, ...] | None = None
    answers: tuple[str, ...] | None = None
    answer_field: str = "answer"
    options_field: str = "options"


def check_rule(row: Row, rule: str) -> None:
    """What `rule` needs of a sample: `choice` its options and an answer naming one of
    them, `vqa` and `vqa-raw` every annotator's answer on a test sample."""
    if rule == "choice":
        if row.options is None:
            raise TaskFileError(
                f"{row.where}field '{row.options_field}': the choice rule needs options"
            )
        try:
            score(row.answer, row.answer, rule, row.options)
        except ValueError as err:
            raise TaskFileError(f"{row.where}field '{row.answer_field}': {err}") from None
    if rule in ("vqa", "vqa-raw") and row.split == "test" and row.answers is None:
        raise TaskFileError(
            f"{row.where}field 'answers': the {rule} rule needs every annotator's answer "
            "on each test sample"
        )


def check_rows(path: Path, rows: Sequence[Row], rule: str) -> None:
    """A task's rows under its rule: a known rule met by every row, and both splits."""
    if rule not in RULES:
        raise TaskFileError(f"{path}: scoring {rule!r} is not one of {', '.join(RULES)}")
    for row in rows:
        check_rule(row, rule)
    for split in ("train", "test"):
        if not any(row.split == split for row in rows):
            raise TaskFileError(f"{path}: no {split} samples")


def stored(names: Sequence[str], tokenized: Collection[str]) -> np.ndarray:
    """Which of `names` are in `tokenized` (a token store: looked up all at once)."""
    if isinstance(tokenized, TokenStore):
        return tokenized.rows(names)[1]
    return np.array([name in tokenized for name in names], dtype=bool)


def check_images(rows: Sequence[Row], tokenized: Collection[str] = ()) -> None:
    """Every row's image file is present, unless its tokens are (to run before a host
    loads: a resumed run reads the tokens back, not the images)."""
    known = stored([str(row.image) for row in rows], tokenized)
    for row, ok in zip(rows, known, strict=True):
        if not ok and not row.image.is_file():
            raise TaskFileError(f"{row.where}field 'image': image file not found: {row.image}")


@dataclass(frozen=True)
class TaskTable:
    """A task's checked samples, their images not tokenized yet, packed (a few buffers, no
    Python object per sample): per split, the image files' paths and the samples' other
    fields (:func:`~modecl.core.tasks.pack_fields`; `source` says where each was read)."""

    rule: str
    images: dict[str, Packed]
    fields: dict[str, dict[str, Sequence[Any]]]

    @classmethod
    def of(cls, rows: Sequence[Row], rule: str) -> TaskTable:
        """The table of checked `rows` (:func:`check_rows`) under `rule`."""
        images, fields = {}, {}
        for split in ("train", "test"):
            mine = [row for row in rows if row.split == split]
            images[split] = Packed(str(row.image) for row in mine)
            fields[split] = pack_fields(
                {
                    "question": row.question,
                    "answer": row.answer,
                    "options": row.options,
                    "source": row.where.rstrip(": "),
                    "answers": row.answers,
                }
                for row in mine
            )
        return cls(rule, images, fields)


def _image_field(sources: Sequence[str]) -> Callable[[int], str]:
    """Sample i's "where" of a message about its image, from the samples' sources."""
    return lambda i: f"{sources[i]}: field 'image': "


def table_task(
    name: str, table: TaskTable, images: ImageTokenizer, answers: Sequence[str] | None = None
) -> Task:
    """The task of a checked `table`, its images tokenized by `images`."""
    splits = {}
    for split in ("train", "test"):
        codes = images.rows_of(table.images[split], _image_field(table.fields[split]["source"]))
        splits[split] = Samples(codes, table.fields[split])
    return Task(name, tuple(answers or ()), splits["train"], splits["test"], scoring=table.rule)


def rows_task(
    name: str,
    rows: Sequence[Row],
    rule: str,
    images: ImageTokenizer,
    answers: Sequence[str] | None = None,
) -> Task:
    """The task of checked `rows` (:func:`check_rows`), their images tokenized by `images`."""
    return table_task(name, TaskTable.of(rows, rule), images, answers)


def load_image_task(
    path: str | Path,
    images: ImageTokenizer,
    name: str | None = None,
    scoring: str | None = None,
    answers: Sequence[str] | None = None,
) -> Task:
    """Read a task file (module doc); `scoring` overrides the file's rule. `answers`
    declares a closed answer set (constrained accuracy); multiple-choice samples have
    theirs in their options."""
    path = Path(path)
    rows, rule = _task_rows(path, scoring)
    return rows_task(name or path.stem, rows, rule, images, answers)


def check_task_file(
    path: Path, scoring: str | None = None, tokenized: Collection[str] = ()
) -> tuple[list[Row], str]:
    """Every check of :func:`load_image_task` that needs no model: fields, rules, splits,
    image files present unless already ``tokenized`` (to run before a host loads); the
    checked rows and the task's rule."""
    rows, rule = _task_rows(Path(path), scoring)
    check_images(rows, tokenized)
    return rows, rule


def _task_rows(path: Path, scoring: str | None) -> tuple[list[Row], str]:
    """The checked lines of a task file and its rule (`scoring`, else the lines')."""
    rows, rules = [], set()
    fields = ("image", "question", "answer", "split")
    optional = ("options", "answers", "scoring")
    for where, record in read_jsonl(path, fields, optional, (*fields, "scoring")):
        options, answers = (
            None if record.get(key) is None else text_list(record[key], where, key)
            for key in ("options", "answers")
        )
        rule = record.get("scoring", "choice" if options else "exact")
        if rule not in RULES:
            raise TaskFileError(
                f"{where}field 'scoring': {rule!r} is not one of {', '.join(RULES)}"
            )
        row = Row(
            where,
            path.parent / record["image"],
            _split(record, where),
            record["question"].strip(),
            record["answer"].strip(),
            options,
            answers,
        )
        check_rule(row, rule)
        rules.add(rule)
        rows.append(row)
    if len(rules) > 1 and scoring is None:
        raise TaskFileError(f"{path}: lines use different scoring rules {sorted(rules)}")
    rule = scoring or (rules.pop() if rules else "exact")
    check_rows(path, rows, rule)
    return rows, rule


@dataclass(frozen=True)
class Pairs:
    """(caption, image codes) pairs: `train` distils, `test` evaluates image generation."""

    train: list[DrawPair]
    test: list[DrawPair]
    test_images: list[Path]  # the real image of each test pair (CLIP image alignment)


def load_pairs(path: str | Path, images: ImageTokenizer) -> Pairs:
    """Read a (caption, image) pairs file (module doc)."""
    path = Path(path)
    rows = _pair_rows(path)
    codes = images([(file, f"{where}field 'image': ") for where, file, *_ in rows])
    out: dict[str, list] = {"train": [], "test": [], "files": []}
    for (_, file, split, caption), image in zip(rows, codes, strict=True):
        out[split].append(DrawPair(caption.strip(), image))
        if split == "test":
            out["files"].append(file)
    return Pairs(out["train"], out["test"], out["files"])


def check_pairs_file(path: Path, tokenized: Collection[str] = ()) -> dict[str, int]:
    """Every check of :func:`load_pairs` that needs no model (to run before a host loads);
    the number of pairs of each split."""
    counts = {"train": 0, "test": 0}
    for where, file, split, _ in _pair_rows(Path(path)):
        if str(file) not in tokenized and not file.is_file():
            raise TaskFileError(f"{where}field 'image': image file not found: {file}")
        counts[split] += 1
    return counts


def _pair_rows(path: Path) -> list[tuple[str, Path, str, str]]:
    """The checked lines of a pairs file: (where, image file, split, caption)."""
    lines = read_jsonl(path, ("caption", "image"), ("split",), ("caption", "image", "split"))
    rows = [
        (where, path.parent / record["image"], _split(record, where, "train"), record["caption"])
        for where, record in lines
    ]
    if not rows:
        raise TaskFileError(f"{path}: no pairs")
    return rows
