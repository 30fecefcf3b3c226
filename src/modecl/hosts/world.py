"""`modecl train`: a transformers host with task files as a world for the one runner.

A Chameleon / Anole or Emu3 checkpoint loaded with `from_pretrained`, JSONL task files
(:mod:`modecl.hosts.tasks`) or CoIN task folders (:mod:`modecl.hosts.coin`), an optional
pairs file and an optional concepts file (:mod:`modecl.hosts.concepts`). After every task
the runner measures every task's test split; this world adds the inter-modal side: the
image-token NLL of the test pairs, and images drawn from the test pairs' captions and from
every concept prompt (PNG where the host has a VQ decoder), CLIP-scored when a CLIP model is
given (:mod:`modecl.hosts.clip`): the pairs' drawings against the test pairs' images, the
concepts' against every concept's reference images. The out dir is the runner's
(:mod:`modecl.core.runner`), plus ``image_tokens/``: every image file's tokens
(:mod:`modecl.hosts.token_cache`), so a resume tokenizes nothing.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
import os
import pickle
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from diffusers import VQModel
from torch import nn
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from modecl.core.adapters import compile_adapters, enable_gradient_checkpointing
from modecl.core.config import ConfigError, to_dict
from modecl.core.evaluate import image_nll_terms
from modecl.core.files import read_image
from modecl.core.methods import get_method
from modecl.core.methods.distillation import check_pairs
from modecl.core.processes import ONE_PROCESS, Processes
from modecl.core.results import Results
from modecl.core.runner import CheckedRun, RunSpec, preflight, run
from modecl.core.sequences import DrawPair, example_lengths, left_padded
from modecl.core.tasks import Task, TaskFileError
from modecl.core.world import Answering, Measured
from modecl.hosts.clip import Clip, ClipUnavailable, References, load_clip
from modecl.hosts.coin import COIN_FILES, check_coin_folder, folder_name, load_coin_task
from modecl.hosts.concepts import Concept, check_concepts_file, load_concepts
from modecl.hosts.config import HostEvalSettings, TrainConfig
from modecl.hosts.host import decode_image, draw_image_tokens, image_grid, save_png
from modecl.hosts.tasks import (
    HostFormat,
    ImageTokenizer,
    Pairs,
    TaskTable,
    check_pairs_file,
    check_task_file,
    load_image_task,
    load_pairs,
    table_task,
)
from modecl.hosts.token_cache import TOKEN_STORE, TokenStore
from modecl.hosts.vqgan import load_vqgan


def default_accelerator() -> Accelerator:
    """An Accelerator for this launch: GPUs when present, else CPU processes (gloo).

    accelerate treats a torchrun launch on a machine without GPUs as distributed only when
    asked for CPU explicitly, and then never as DeepSpeed. DeepSpeed is asked for as
    `accelerate launch` asks for it, by ``ACCELERATE_USE_DEEPSPEED=true`` and the
    ``ACCELERATE_DEEPSPEED_*`` variables (docs/scale-out.md); launched CPU processes then
    need the process group's backend named, else each believes it is alone; a process
    that no launcher started is refused (accelerate would train it without DeepSpeed).
    """
    if torch.cuda.is_available():
        return Accelerator()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return Accelerator(cpu=True)
    if "LOCAL_RANK" not in os.environ:  # accelerate would quietly train without DeepSpeed
        raise ConfigError(
            "ACCELERATE_USE_DEEPSPEED is set but no launcher started this process: run it under "
            "torchrun (python -m torch.distributed.run --nproc_per_node N -m modecl.cli ...)"
        )
    return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])


def load_host(path: str, dtype: str, device: torch.device) -> tuple[nn.Module, Any]:
    """The model (eval mode, on `device`) and tokenizer of a local directory or hub id;
    ``dtype`` one of :class:`~modecl.hosts.config.HostSettings`' (checked with the config)."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if Path(path).is_file():
        raise ConfigError(
            f"--model {path}: is a file; expected a checkpoint folder (save_pretrained) or a hub id"
        )
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtypes[dtype])
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as err:
        raise ConfigError(f"cannot load a host model and tokenizer from {path}: {err}") from None
    return model.to(device).eval(), tokenizer


def _image_reader(
    model: nn.Module,
    path: str,
    config: TrainConfig,
    progress: bool,
    folder: Path,
    processes: Processes,
) -> ImageTokenizer:
    size = config.host.image_size
    if size is None:
        try:
            size = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"no image processor at {path} ({err}); set host.image_size to resize instead"
            ) from None
    batch = config.host.tokenize_batch_size
    return ImageTokenizer(model, size, batch, progress, folder, processes=processes)


def _vqgan(model: nn.Module, fmt: HostFormat, path: str, config: TrainConfig) -> VQModel | None:
    """Chameleon's VQGAN decoder from `host.vqgan` or the checkpoint; None without weights."""
    if fmt.vocab.family != "chameleon":
        if config.host.vqgan is not None:
            raise ConfigError("host.vqgan: only a Chameleon / Anole host takes a VQGAN decoder")
        return None
    try:
        return load_vqgan(model, config.host.vqgan or path)
    except (OSError, ValueError) as err:
        raise ConfigError(str(err)) from None


def _draw(
    model: nn.Module, fmt: HostFormat, chosen: Sequence[DrawPair], ev: HostEvalSettings, seed: int
) -> list[torch.Tensor]:
    """An image span drawn after each caption of `chosen`, at its image's code grid: sampled
    at `eval.temperature` / `eval.top_k`, in left-padded batches of one grid each."""
    generator = torch.Generator(model.device).manual_seed(seed)
    spans: list[torch.Tensor] = [torch.empty(0)] * len(chosen)
    for index, ids, mask in left_padded(
        [fmt.draw_prompt(p) for p in chosen],
        fmt.pad_id,
        ev.batch_size,
        group=[image_grid(fmt.vocab, p.codes) for p in chosen],  # a batch draws one size
    ):
        tokens = draw_image_tokens(
            model,
            ids.to(model.device),
            image_grid(fmt.vocab, chosen[index[0]].codes),
            attention_mask=None if mask is None else mask.to(model.device),
            temperature=ev.temperature,
            top_k=ev.top_k,
            generator=generator,
        )
        for i, row in zip(index, tokens.cpu(), strict=True):
            spans[i] = row
    return spans


# The headline numbers of a drawing entry's CLIP scores: (measure suffix, field).
HEADLINE = (
    ("clip_image_all", "image_alignment_all"),
    ("clip_image_own", "image_alignment_own"),
    ("clip_text", "text_alignment"),
    ("kid", "kid"),
    ("fd", "fd"),
)


def _named(kind: str, entry: dict[str, Any]) -> dict[str, Any]:
    """`entry` as the measure `<kind>_generation`, its headline numbers beside it."""
    clip = entry["clip"]
    return {f"{kind}_generation": entry} | {f"{kind}_{k}": clip.get(f) for k, f in HEADLINE}


def _concept_draws(
    concepts: Sequence[Concept], draws: int, folder: Path
) -> tuple[list[DrawPair], list[Path], list[str]]:
    """`draws` drawings of every concept prompt: what each is drawn from, its file (the
    prompt's and the draw's index under the concept's folder) and its concept."""
    chosen, files, groups = [], [], []
    for concept in concepts:
        for j, prompt in enumerate(concept.prompts):
            for d in range(draws):
                chosen.append(DrawPair(prompt, concept.codes))
                files.append(folder / concept.name / f"{j}-{d}.png")
                groups.append(concept.name)
    return chosen, files, groups


class HostWorld:
    """A transformers host, its tasks and pairs (:class:`modecl.core.world.World`)."""

    def __init__(
        self,
        model: nn.Module,
        fmt: HostFormat,
        tasks: list[Task],
        pairs: Pairs | None,
        config: TrainConfig,
        vqgan: VQModel | None,
        concepts: list[Concept] | None = None,
    ) -> None:
        self.model, self.format, self._tasks, self.pairs, self.config = (
            model,
            fmt,
            tasks,
            pairs,
            config,
        )
        self.vqgan = vqgan  # Chameleon's decoder of drawings (modecl.hosts.vqgan)
        self.concepts = concepts or []
        self._clip: Clip | None = None  # loaded on first use, by the main process only
        self._scoring: dict[str, References] = {}  # "pairs", "concepts": their references
        self.answering = Answering(config.eval.max_new_tokens, config.eval.batch_size)

    @property
    def host(self) -> nn.Module:
        return self.model

    def tasks(self) -> list[Task]:
        return self._tasks

    def distill_pairs(self) -> Sequence[DrawPair]:
        return self.pairs.train if self.pairs else []

    def probe_pairs(self, size: int) -> Sequence[DrawPair]:
        return self.pairs.test[:size] if self.pairs else []

    def measure(self, model: nn.Module, seed: int, images: Path, processes: Processes) -> Measured:
        """Image-token NLL of the test pairs (shared out); drawings of the test pairs and the
        concepts, decoded and scored (main process)."""
        pairs, ev = self.pairs, self.config.eval
        measures: dict[str, Any] = {}
        if pairs is not None and pairs.test:
            mine = processes.share(pairs.test)
            terms = processes.gather([image_nll_terms(model, self.format, mine, ev.batch_size)])
            measures["image_nll"] = sum(t for t, _ in terms) / max(sum(n for _, n in terms), 1)
        if not processes.main:
            return Measured(measures)
        pixels = None
        if pairs is not None and pairs.test:
            chosen = pairs.test[: ev.draws]
            files = [images / f"{i}.png" for i in range(len(chosen))]
            own = [str(i) for i in range(len(chosen))]  # a pair's own image: its group
            entry = self._generation("pairs", model, chosen, files, own, seed)
            arrays = [np.asarray(read_image(f)) for f in files] if "images" in entry else []
            if arrays and len({a.shape for a in arrays}) == 1:
                pixels = np.stack(arrays)[None]
            measures |= _named("pairs", entry)
        if self.concepts:
            chosen, files, groups = _concept_draws(self.concepts, ev.draws, images / "concepts")
            entry = self._generation("concepts", model, chosen, files, groups, seed)
            if entry.pop("images", None):  # hundreds: the folder says where they are
                entry["folder"] = str(images / "concepts")
            measures |= _named("concepts", entry)
        return Measured(measures, pixels)

    def _generation(
        self,
        kind: str,
        model: nn.Module,
        chosen: Sequence[DrawPair],
        files: Sequence[Path],
        groups: Sequence[str],
        seed: int,
    ) -> dict[str, Any]:
        """Draw after each caption of `chosen`, decode to `files` and score the drawings
        against `kind`'s references (drawing i of group `groups[i]`), where possible."""
        spans = _draw(model, self.format, chosen, self.config.eval, seed)
        out: dict[str, Any] = {"drawn": len(spans)}
        if not spans:
            return out | {"clip": {"status": "unavailable", "reason": "eval.draws is 0"}}
        if self.format.vocab.family == "chameleon" and self.vqgan is None:
            reason = "no VQGAN decoder weights in the checkpoint; set host.vqgan"
            return out | {"clip": {"status": "unavailable", "reason": reason}}
        for tokens, file in zip(spans, files, strict=True):
            save_png(decode_image(model, tokens[None].to(model.device), self.vqgan)[0], file)
        out["images"] = [str(f) for f in files]
        references = self._references(kind)
        if isinstance(references, str):
            return out | {"clip": {"status": "unavailable", "reason": references}}
        prompts = [p.prompt for p in chosen]
        scores = references.score(files, prompts, groups, seed, per_concept=kind == "concepts")
        return out | {"clip": scores}

    def _references(self, kind: str) -> References | str:
        """`kind`'s reference images (pairs: every test pair's, its own group; concepts:
        every concept's), embedded on first use; or why there is no CLIP score."""
        if kind in self._scoring:
            return self._scoring[kind]
        if self.config.eval.clip_model is None:
            return "no CLIP model configured (eval.clip_model)"
        try:
            self._clip = self._clip or load_clip(self.config.eval.clip_model, self.model.device)
        except ClipUnavailable as err:
            return str(err)
        if kind == "pairs":
            files = list(self.pairs.test_images)
            groups = [str(i) for i in range(len(files))]
        else:
            files = [f for c in self.concepts for f in c.images]
            groups = [c.name for c in self.concepts for _ in c.images]
        try:
            self._scoring[kind] = References(self._clip, files, groups)
        except ValueError as err:  # an unreadable reference image
            raise TaskFileError(f"a reference image of the {kind}: {err}") from None
        return self._scoring[kind]

    def describe(self) -> dict[str, Any]:
        config = self.model.config.to_json_string(use_diff=False).encode()
        return {
            "host": {
                "checkpoint": getattr(self.model, "name_or_path", None),
                "config_sha256": hashlib.sha256(config).hexdigest(),
                "family": self.format.vocab.family,
                "dtype": str(self.model.dtype),
            }
        }


def check_context(
    model: nn.Module,
    fmt: HostFormat,
    tasks: list[Task],
    pairs: Pairs | None,
    kd_data: Any,
    concepts: Sequence[Concept] = (),
) -> None:
    """Refuse, before training, a sample, pair or concept prompt longer than the host's
    context."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is None:
        return
    for task in tasks:
        for samples in (task.train, task.test):
            lengths = example_lengths(fmt, samples)
            over = np.flatnonzero(lengths > limit)
            if len(over):
                sample = samples[int(over[0])]
                raise ConfigError(
                    f"{sample.source or task.name}: the image, question and answer take "
                    f"{lengths[over[0]]} tokens, more than the host's context of {limit} "
                    "(max_position_embeddings)"
                )
    for i, pair in enumerate([*pairs.train, *pairs.test] if pairs else []):
        length = len(fmt.draw_example(pair).input_ids)
        if length > limit:
            raise ConfigError(
                f"{kd_data}: pair {i + 1} ({pair.prompt[:40]!r}) takes {length} tokens, more "
                f"than the host's context of {limit} (max_position_embeddings)"
            )
    for concept in concepts:
        for prompt in concept.prompts:
            length = len(fmt.draw_example(DrawPair(prompt, concept.codes)).input_ids)
            if length > limit:
                raise ConfigError(
                    f"{concept.source}: prompt {prompt[:40]!r} and its drawing take {length} "
                    f"tokens, more than the host's context of {limit} (max_position_embeddings)"
                )


def _task_name(path: Path) -> str:
    """A task's name: a CoIN folder's name, a task file's stem."""
    return folder_name(path) if path.is_dir() else path.stem


@dataclass(frozen=True)
class InputFiles:
    """What a `modecl train` run reads beside the host: its task files and CoIN task
    folders (``tasks``), the image-generation pairs (``kd_data``), the root of the CoIN
    folders' image paths and the concepts file."""

    tasks: list[Path]
    kd_data: Path | None = None
    image_root: Path | None = None
    concepts: Path | None = None

    @classmethod
    def of(
        cls,
        tasks: Sequence[str | Path],
        kd_data: str | Path | None = None,
        image_root: str | Path | None = None,
        concepts: str | Path | None = None,
    ) -> InputFiles:
        """The files as paths (given as strings or paths; None: not given)."""
        kd_data, image_root, concepts = (
            None if f is None else Path(f) for f in (kd_data, image_root, concepts)
        )
        return cls([Path(f) for f in tasks], kd_data, image_root, concepts)


def check_inputs(
    files: InputFiles,
    config: TrainConfig,
    tokenized: Collection[str] = (),
    read: dict[str, TaskTable] | None = None,
    distilling: Sequence[str] = (),
) -> list[str]:
    """Every check of the input files that needs no model, before minutes of loading it;
    the task names. Images whose tokens are ``tokenized`` (a resumed run's) need not be
    present. `read`, if given, receives each task's checked samples (:class:`TaskTable`)
    by its name. `distilling`: the run's methods that distil, whose stream the pairs file's
    train pairs must fill."""
    task_files, kd_data, image_root = files.tasks, files.kd_data, files.image_root
    concepts = files.concepts
    folders = [f for f in task_files if f.is_dir()]  # CoIN task folders
    singles = [*(f for f in task_files if f not in folders), kd_data, concepts, config.host.vqgan]
    for file in singles:
        if file is None:
            continue
        if Path(file).is_dir():
            raise ConfigError(f"{file}: is a directory, expected a file")
        if not Path(file).is_file():
            raise ConfigError(f"{file}: file not found")
    if image_root is not None:
        if not folders:
            raise ConfigError("--image-root is for CoIN task folders; no --tasks entry is one")
        if not image_root.is_dir():
            raise ConfigError(f"--image-root {image_root}: not a folder")
    names = [_task_name(f) for f in task_files]
    if len(set(names)) != len(names):
        raise ConfigError(f"task names (the files' stems, the folders' names) repeat: {names}")
    for file, name in zip(task_files, names, strict=True):
        if file in folders:
            rows = check_coin_folder(file, image_root, name, config.scoring.get(name), tokenized)
        else:
            rows = check_task_file(file, config.scoring.get(name), tokenized)
        if read is not None:
            read[name] = TaskTable.of(*rows)
    if distilling and kd_data is None:
        raise ConfigError(f"method(s) {list(distilling)} distil: give --kd-data with train pairs")
    if kd_data is not None:
        pairs = check_pairs_file(kd_data, tokenized)
        if distilling:
            batch = config.continual.distill.batch_size
            try:
                check_pairs(distilling[0], pairs["train"], batch, pairs["test"])
            except ConfigError as err:
                raise ConfigError(f"{kd_data}: {err}") from None
    if concepts is not None:
        check_concepts_file(concepts)
    for key in ("scoring", "answer_sets"):
        unknown = sorted(set(getattr(config, key)) - set(names))
        if unknown:
            raise ConfigError(f"{key} names unknown tasks {unknown}; the tasks are {names}")
    return names


@dataclass
class Inputs:
    """A `modecl train` run past its pre-flight (:func:`train_preflight`): the checked run,
    its input files, the task names and, where asked for, each task's checked samples by
    name."""

    checked: CheckedRun
    files: InputFiles
    names: list[str]
    tables: dict[str, TaskTable]


def in_child(function: Callable[[], Any]) -> Any:
    """``function()`` in a forked child process, its result or its exception sent back
    pickled: what it allocates on the way (the parsed JSON of every task file, millions of
    small objects at CoIN's size) leaves with the child instead of fragmenting this
    process's heap."""
    context = multiprocessing.get_context("fork")  # the child runs `function` as it is here
    receive, send = context.Pipe(duplex=False)

    def run() -> None:
        try:
            send.send((True, function()))
        except Exception as err:  # raised here, in this process
            send.send((False, err))

    child = context.Process(target=run, name="modecl-read")
    child.start()
    send.close()
    try:
        done, value = receive.recv()
    except EOFError:  # it died before it could answer
        done, value = False, None
    child.join()
    if value is None and not done:
        raise RuntimeError(f"the process reading the inputs died (exit code {child.exitcode})")
    if not done:
        raise value
    return value


def train_preflight(
    model_path: str,
    task_files: Sequence[str | Path],
    methods: list[str] | str,
    out: Path,
    *,
    kd_data: Path | None = None,
    image_root: Path | None = None,
    concepts: Path | None = None,
    config: TrainConfig,
    seeds: int = 1,
    config_files: Sequence[Path] = (),
    processes: Processes = ONE_PROCESS,
    tables: bool = False,
) -> Inputs:
    """`modecl train`'s pre-flight: every check of :func:`train_run` before the host loads
    (arguments as there), each once; writes nothing. The runner's checks
    (:func:`modecl.core.runner.preflight`: methods, trackers, engine, the out dir), then the
    input files (:func:`check_inputs`); with `tables`, each task's checked samples are kept,
    read in a child process (:func:`in_child`)."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if not task_files:
        raise ConfigError("a run needs at least one task file or folder")
    files = InputFiles.of(task_files, kd_data, image_root, concepts)
    inputs = {
        "model": str(model_path),
        "tasks": [str(f) for f in files.tasks],
        "kd_data": None if files.kd_data is None else str(files.kd_data),
    }
    if files.image_root is not None:  # absent otherwise: earlier versions' out dirs resume
        inputs["image_root"] = str(files.image_root)
    if files.concepts is not None:  # likewise
        inputs["concepts"] = str(files.concepts)
    read = [p for f in files.tasks for p in ([f / n for n in COIN_FILES] if f.is_dir() else [f])]
    spec = RunSpec(
        methods=methods,
        seed_list=[config.seed + i for i in range(seeds)],
        continual=config.continual,
        front="train",
        config=to_dict(config),
        inputs=inputs,
        files=[
            *read,
            *(f for f in (files.kd_data, files.concepts) if f),
            *(Path(f) for f in config_files),
        ],
        tracking=list(config.tracking.log_with),
    )
    checked = preflight(spec, out, processes)
    distilling = [m for m in methods if get_method(m).needs_pairs]
    read_files = functools.partial(_read_inputs, files, config, Path(out), distilling)
    names, kept = in_child(read_files) if tables else read_files()
    return Inputs(checked, files, names, kept)


def _read_inputs(
    files: InputFiles, config: TrainConfig, out: Path, distilling: list[str]
) -> tuple[list[str], dict[str, TaskTable]]:
    """:func:`check_inputs` of a run's files, its task names and checked samples; images
    the out dir's token store holds need not be present (a resume)."""
    kept: dict[str, TaskTable] = {}
    tokenized = TokenStore(out / TOKEN_STORE)  # ``path in`` it: a lookup in its index
    names = check_inputs(files, config, tokenized, kept, distilling)
    return names, kept


def train_run(
    model_path: str,
    task_files: Sequence[str | Path],
    methods: list[str] | str,
    out: Path,
    *,
    kd_data: Path | None = None,
    image_root: Path | None = None,
    concepts: Path | None = None,
    config: TrainConfig | None = None,
    seeds: int = 1,
    progress: bool = True,
    processes: Processes | None = None,
    config_files: Sequence[Path] = (),
) -> Results:
    """Train every method of `methods` through `task_files` (JSONL task files or CoIN task
    folders, whose image paths start at `image_root`, default each folder's parent) on the
    host at `model_path`, over `seeds` seeds from `config.seed` on; writes the out dir and
    returns results.json. `concepts` is a concepts file (:mod:`modecl.hosts.concepts`) to
    draw from after every task. `config_files` (the TOML it came from) are hashed into the
    run key with the input files. `processes`: the run's (default: this launch's,
    :func:`default_accelerator`)."""
    config = config or TrainConfig()
    if processes is None:
        processes = Processes(default_accelerator())
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
        processes=processes,
        tables=True,  # read once: the tasks are built from them
    )
    model, tokenizer = load_host(model_path, config.host.dtype, processes.accelerator.device)
    world, images = host_world(
        model,
        tokenizer,
        model_path=model_path,
        config=config,
        files=inputs.files,
        names=inputs.names,
        token_cache=Path(out) / TOKEN_STORE,
        tables=inputs.tables,
        processes=processes,
        progress=progress and processes.main,
    )
    if config.host.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    compile_adapters(model, config.host.compile_adapters)
    images.commit()  # every input passed its checks: its tokens join the out dir
    return run(world, inputs.checked, progress=progress)


def host_world(
    model: nn.Module,
    tokenizer: Any,
    *,
    model_path: str,
    config: TrainConfig,
    files: InputFiles,
    names: list[str],
    token_cache: Path,
    tables: dict[str, TaskTable] | None = None,
    processes: Processes = ONE_PROCESS,
    progress: bool = True,
) -> tuple[HostWorld, ImageTokenizer]:
    """The world of a loaded host and its checked inputs, and the image tokenizer that read
    them into the token store `token_cache` (read back first: nothing is tokenized twice).
    `tables`: each task's checked samples as :func:`check_inputs` read them, taken out as
    the tasks are built (else the files are read again)."""
    kd_data, image_root, concepts = files.kd_data, files.image_root, files.concepts
    fmt = HostFormat.from_model(model, tokenizer)
    vqgan = _vqgan(model, fmt, model_path, config)
    images = _image_reader(model, model_path, config, progress, token_cache, processes)
    tasks = []
    for file, name in zip(files.tasks, names, strict=True):
        rule, answers = config.scoring.get(name), config.answer_sets.get(name)
        if tables:
            tasks.append(table_task(name, tables.pop(name), images, answers))
        elif file.is_dir():
            tasks.append(load_coin_task(file, images, image_root, name, rule, answers))
        else:
            tasks.append(load_image_task(file, images, name, rule, answers))
    if config.eval.max_test_samples is not None:
        for task in tasks:
            task.test = task.test[: config.eval.max_test_samples]
    pairs = None if kd_data is None else load_pairs(kd_data, images)
    concept_list = [] if concepts is None else load_concepts(concepts, images)
    check_context(model, fmt, tasks, pairs, kd_data, concept_list)
    return HostWorld(model, fmt, tasks, pairs, config, vqgan, concept_list), images
