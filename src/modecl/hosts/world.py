"""`modecl train`: a transformers host with task files as a world for the one runner.

A Chameleon / Anole or Emu3 checkpoint loaded with `from_pretrained`, JSONL task files and
an optional pairs file (:mod:`modecl.hosts.tasks`). After every task the runner measures
every task's test split; this world adds the inter-modal side: the image-token NLL of the
test pairs and images drawn from their captions (PNG where the host has a VQ decoder,
CLIP-scored when a CLIP model is given). The out dir is the runner's
(:mod:`modecl.core.runner`), plus ``image_tokens/``: every image file's tokens
(:mod:`modecl.hosts.token_cache`), so a resume tokenizes nothing. CLIP image alignment
compares a drawn image with its test pair's real image.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import VQModel
from PIL import Image
from torch import nn
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from modecl.core.adapters import enable_gradient_checkpointing
from modecl.core.config import ConfigError, to_dict
from modecl.core.evaluate import image_nll_terms
from modecl.core.files import read_image
from modecl.core.methods import get_method
from modecl.core.methods.distillation import check_pairs
from modecl.core.results import Results
from modecl.core.runner import RunSpec, check_methods, check_run_key, run
from modecl.core.sequences import DrawPair, left_padded
from modecl.core.tasks import Task
from modecl.core.world import Answering, Measured
from modecl.hosts.clip import ClipAlignment, clip_alignment
from modecl.hosts.config import TrainConfig
from modecl.hosts.host import decode_image, draw_image_tokens, image_grid, save_png
from modecl.hosts.tasks import (
    HostFormat,
    ImageTokenizer,
    Pairs,
    check_pairs_file,
    check_task_file,
    load_image_task,
    load_pairs,
    read_token_cache,
)
from modecl.hosts.token_cache import TOKEN_STORE
from modecl.hosts.vqgan import load_vqgan


def default_accelerator() -> Accelerator:
    """An Accelerator for this launch: GPUs when present, else CPU processes (gloo).

    accelerate treats a torchrun launch on a machine without GPUs as distributed only when
    asked for CPU explicitly.
    """
    return Accelerator(cpu=not torch.cuda.is_available())


def load_host(path: str, dtype: str, device: torch.device) -> tuple[nn.Module, Any]:
    """The model (eval mode, on `device`) and tokenizer of a local directory or hub id."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype not in dtypes:
        raise ConfigError(f"host.dtype: {dtype!r} is not one of auto, {', '.join(dtypes)}")
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
    model: nn.Module, path: str, config: TrainConfig, progress: bool, folder: Path
) -> ImageTokenizer:
    size = config.host.image_size
    if size is None:
        try:
            size = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"no image processor at {path} ({err}); set host.image_size to resize instead"
            ) from None
    return ImageTokenizer(model, size, config.host.tokenize_batch_size, progress, folder)


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


def _read_rgb(path: Path) -> Image.Image:
    return read_image(path)


def _generation(
    model: nn.Module,
    fmt: HostFormat,
    pairs: Pairs,
    config: TrainConfig,
    folder: Path,
    seed: int,
    vqgan: VQModel | None,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Draw an image from each test caption; decode, save and CLIP-score where possible.

    Returns the generation entry and the decoded drawings as one row of RGB bytes
    ``[1, n, H, W, 3]`` for the report (None without a decoder or with mixed sizes)."""
    ev = config.eval
    chosen = pairs.test[: ev.draws]
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
    drawn, pixels = spans, None
    out: dict[str, Any] = {"drawn": len(drawn)}
    if fmt.vocab.family == "chameleon" and vqgan is None:
        clip = ClipAlignment(
            unavailable="no VQGAN decoder weights in the checkpoint; set host.vqgan"
        )
    else:
        files = []
        for i, tokens in enumerate(drawn):
            image = decode_image(model, tokens[None].to(model.device), vqgan)[0]
            files.append(save_png(image, folder / f"{i}.png"))
        out["images"] = [str(f) for f in files]
        arrays = [np.asarray(_read_rgb(f)) for f in files]
        if arrays and len({a.shape for a in arrays}) == 1:
            pixels = np.stack(arrays)[None]
        if ev.clip_model is None:
            clip = ClipAlignment(unavailable="no CLIP model configured (eval.clip_model)")
        else:
            images = [_read_rgb(f) for f in files]
            references = [[_read_rgb(f)] for f in pairs.test_images[: len(files)]]
            prompts = [p.prompt for p in chosen]
            clip = clip_alignment(ev.clip_model, images, prompts, references, device=model.device)
    out["clip"] = clip.to_dict()
    return out, pixels


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
    ) -> None:
        self.model, self.format, self._tasks, self.pairs, self.config = (
            model,
            fmt,
            tasks,
            pairs,
            config,
        )
        self.vqgan = vqgan  # Chameleon's decoder of drawings (modecl.hosts.vqgan)
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

    def measure(
        self, model: nn.Module, seed: int, images: Path, rank: int, processes: int, gather: Any
    ) -> Measured:
        """Image-token NLL of the test pairs (shared out), drawings and CLIP (main process)."""
        pairs, ev = self.pairs, self.config.eval
        if pairs is None or not pairs.test:
            return Measured()
        terms = gather(
            [image_nll_terms(model, self.format, pairs.test[rank::processes], ev.batch_size)]
        )
        measures: dict[str, Any] = {
            "image_nll": sum(t for t, _ in terms) / max(sum(n for _, n in terms), 1)
        }
        if rank > 0:
            return Measured(measures)
        generation, pixels = _generation(
            model, self.format, pairs, self.config, images, seed, self.vqgan
        )
        clip = generation["clip"]
        measures |= {
            "generation": generation,
            "clip_image_alignment": clip.get("image_alignment"),
            "clip_text_alignment": clip.get("text_alignment"),
        }
        return Measured(measures, pixels)

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
    model: nn.Module, fmt: HostFormat, tasks: list[Task], pairs: Pairs | None, kd_data: Any
) -> None:
    """Refuse, before training, a sample or pair longer than the host's context."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is None:
        return
    for task in tasks:
        for sample in [*task.train, *task.test]:
            length = len(fmt.prompt(sample)) + len(fmt.answer_ids(sample.answer))
            if length > limit:
                raise ConfigError(
                    f"{sample.source or task.name}: the image, question and answer take "
                    f"{length} tokens, more than the host's context of {limit} "
                    "(max_position_embeddings)"
                )
    for i, pair in enumerate([*pairs.train, *pairs.test] if pairs else []):
        length = len(fmt.draw_example(pair).input_ids)
        if length > limit:
            raise ConfigError(
                f"{kd_data}: pair {i + 1} ({pair.prompt[:40]!r}) takes {length} tokens, more "
                f"than the host's context of {limit} (max_position_embeddings)"
            )


def train_run(
    model_path: str,
    task_files: list[Path],
    methods: list[str] | str,
    out: Path,
    *,
    kd_data: Path | None = None,
    config: TrainConfig | None = None,
    seeds: int = 1,
    progress: bool = True,
    accelerator: Accelerator | None = None,
    config_files: Sequence[Path] = (),
) -> Results:
    """Train every method of `methods` through `task_files` on the host at `model_path`,
    over `seeds` seeds from `config.seed` on; writes the out dir and returns results.json.
    `config_files` (the TOML it came from) are hashed into the run key with the task files."""
    config = config or TrainConfig()
    methods = [methods] if isinstance(methods, str) else list(methods)
    check_methods(methods)
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if not task_files:
        raise ConfigError("a run needs at least one task file")
    # Everything that can be checked without the model, before minutes of loading it.
    for file in [*task_files, *(f for f in (kd_data, config.host.vqgan) if f)]:
        if Path(file).is_dir():
            raise ConfigError(f"{file}: is a directory, expected a file")
        if not Path(file).is_file():
            raise ConfigError(f"{file}: file not found")
    names = [Path(f).stem for f in task_files]
    if len(set(names)) != len(names):
        raise ConfigError(f"task names (the files' stems) repeat: {names}")
    tokenized = read_token_cache(Path(out) / TOKEN_STORE)  # a resume needs no images
    for file, name in zip(task_files, names, strict=True):
        check_task_file(file, config.scoring.get(name), tokenized)
    if kd_data is not None:
        check_pairs_file(kd_data, tokenized)
    for key in ("scoring", "answer_sets"):
        unknown = sorted(set(getattr(config, key)) - set(names))
        if unknown:
            raise ConfigError(f"{key} names unknown tasks {unknown}; the tasks are {names}")
    distilling = [m for m in methods if get_method(m).needs_pairs]
    if distilling and kd_data is None:
        raise ConfigError(f"method(s) {distilling} distil: give --kd-data with train pairs")
    spec = RunSpec(
        methods=methods,
        seeds=[config.seed + i for i in range(seeds)],
        continual=config.continual,
        front="train",
        config=to_dict(config),
        inputs={
            "model": str(model_path),
            "tasks": [str(f) for f in task_files],
            "kd_data": None if kd_data is None else str(kd_data),
        },
        files=[Path(f) for f in [*task_files, *([kd_data] if kd_data else []), *config_files]],
    )
    out = Path(out)
    check_run_key(out, spec)
    accelerator = accelerator or default_accelerator()
    main = accelerator.is_main_process
    model, tokenizer = load_host(model_path, config.host.dtype, accelerator.device)
    fmt = HostFormat.from_model(model, tokenizer)
    vqgan = _vqgan(model, fmt, model_path, config)
    images = _image_reader(model, model_path, config, progress and main, out / TOKEN_STORE)
    tasks = [
        load_image_task(f, images, scoring=config.scoring.get(n), answers=config.answer_sets.get(n))
        for f, n in zip(task_files, names, strict=True)
    ]
    if config.eval.max_test_samples is not None:
        for task in tasks:
            task.test = task.test[: config.eval.max_test_samples]
    pairs = None if kd_data is None else load_pairs(kd_data, images)
    check_context(model, fmt, tasks, pairs, kd_data)
    if distilling:
        try:
            check_pairs(distilling[0], len(pairs.train), config.continual.distill.batch_size)
        except ValueError as err:
            raise ConfigError(f"{kd_data}: {err}") from None
    if config.host.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    world = HostWorld(model, fmt, tasks, pairs, config, vqgan)
    return run(world, spec, out, accelerator=accelerator, progress=progress)
