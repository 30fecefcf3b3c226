"""`modecl train`: one method through a sequence of JSONL tasks on a transformers host.

The same loop as the digits benchmark (:func:`modecl.core.train.train_task`), on a Chameleon /
Anole or Emu3 checkpoint loaded with `from_pretrained`. After every task it measures every
task's test split (the accuracy matrix, forgetting, BWT) and, with a pairs file, the
inter-modal side: the image-token NLL of its test pairs and images drawn from their
captions (PNG where the host has a VQ decoder, CLIP-scored when a CLIP model is given);
in one process, the gradient-conflict monitor (:mod:`modecl.core.conflict`) probes the same
test pairs when `continual.monitor.enabled`.

Layout of an out dir::

    results.json                 every number (schema ``modecl.train/1``); report.md
    run.json                     what the run was started with (a resume must match it)
    image_tokens.json            every image file's tokens (a resume reads them back)
    checkpoints/pretrained/      the host's measures before any task (stage.json)
    checkpoints/stage<K>/        stage.json (measures, every answer given), drawn.pt (the
                                 drawn spans), adapters/, method.pt
    images/{pre,stage<K>}/<i>.png  drawn images (hosts with a VQ decoder)

Each stage is written atomically once trained and measured; re-running the same command
resumes after the last finished stage. Under `accelerate launch` every process trains on
its share of each batch and answers its share of the test sets; the main process draws
and writes. CLIP image alignment compares a drawn image with its test pair's real image.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from modecl.core.adapters import attach_adapters, enable_gradient_checkpointing
from modecl.core.config import ConfigError, to_dict
from modecl.core.conflict import ConflictMonitor, summarize_conflict
from modecl.core.evaluate import answer, image_nll_terms, scored_accuracy
from modecl.core.files import write_atomic
from modecl.core.methods import METHOD_NAMES, get_method
from modecl.core.metrics import summarize
from modecl.core.report import write_train_report
from modecl.core.runner import peak_memory_mb, resumable, save_stage
from modecl.core.sequences import left_padded
from modecl.core.tasks import Task
from modecl.core.train import train_task
from modecl.hosts.clip import ClipAlignment, clip_alignment
from modecl.hosts.config import TrainConfig
from modecl.hosts.host import decode_image, draw_image_tokens, image_grid, save_png
from modecl.hosts.tasks import HostFormat, ImageTokenizer, Pairs, load_image_task, load_pairs

SCHEMA = "modecl.train/1"


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
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtypes[dtype])
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load a host model and tokenizer from {path}: {err}") from None
    return model.to(device).eval(), tokenizer


def _image_reader(
    model: nn.Module, path: str, config: TrainConfig, progress: bool
) -> ImageTokenizer:
    size = config.host.image_size
    if size is None:
        try:
            size = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"no image processor at {path} ({err}); set host.image_size to resize instead"
            ) from None
    return ImageTokenizer(model, size, config.host.tokenize_batch_size, progress)


def _read_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _generation(
    model: nn.Module,
    fmt: HostFormat,
    pairs: Pairs,
    config: TrainConfig,
    folder: Path,
    seed: int,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Draw an image from each test caption; decode, save and CLIP-score where possible."""
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
    drawn = spans
    out: dict[str, Any] = {"drawn": len(drawn)}
    if fmt.vocab.family != "emu3":
        clip = ClipAlignment(unavailable="no VQ decoder for this host in transformers (Chameleon)")
    else:
        files = []
        for i, tokens in enumerate(drawn):
            pixels = decode_image(model, tokens[None].to(model.device))[0]
            files.append(save_png(pixels, folder / f"{i}.png"))
        out["images"] = [str(f) for f in files]
        if ev.clip_model is None:
            clip = ClipAlignment(unavailable="no CLIP model configured (eval.clip_model)")
        else:
            images = [_read_rgb(f) for f in files]
            references = [[_read_rgb(f)] for f in pairs.test_images[: len(files)]]
            prompts = [p.prompt for p in chosen]
            clip = clip_alignment(ev.clip_model, images, prompts, references, device=model.device)
    out["clip"] = clip.to_dict()
    return out, torch.stack(drawn) if drawn else torch.empty(0)


def measure(
    model: nn.Module,
    fmt: HostFormat,
    tasks: list[Task],
    pairs: Pairs | None,
    config: TrainConfig,
    images_dir: Path,
    seed: int,
    accelerator: Accelerator,
) -> tuple[dict[str, Any], dict[str, list[str]], torch.Tensor]:
    """Every measure of one stage, the answers given per task, and the drawn spans.

    Every process answers and scores its share of the test sets; the main one also draws
    (its return values are the complete ones).
    """
    model.eval()
    ev = config.eval
    rank, world = accelerator.process_index, accelerator.num_processes
    accuracy, answers = [], {}
    for task in tasks:
        mine = list(range(rank, len(task.test), world))
        given = answer(model, fmt, [task.test[i] for i in mine], ev.max_new_tokens, ev.batch_size)
        answers[task.name] = [""] * len(task.test)
        for index, texts in gather_object([(mine, given)]):
            for i, text in zip(index, texts, strict=True):
                answers[task.name][i] = text
        accuracy.append(scored_accuracy(task, answers[task.name]))
    measures: dict[str, Any] = {"task_accuracy": accuracy}
    drawn = torch.empty(0)
    if pairs is not None and pairs.test:
        terms = gather_object([image_nll_terms(model, fmt, pairs.test[rank::world], ev.batch_size)])
        measures["image_nll"] = sum(t for t, _ in terms) / max(sum(n for _, n in terms), 1)
        if accelerator.is_main_process:
            measures["generation"], drawn = _generation(model, fmt, pairs, config, images_dir, seed)
    return measures, answers, drawn


def _check_resume(out: Path, run: dict[str, Any]) -> None:
    saved = out / "run.json"
    if saved.exists() and json.loads(saved.read_text()) != run:
        raise ConfigError(
            f"{out} holds a run started differently ({saved}); use another --out or delete it"
        )


def train_run(
    model_path: str,
    task_files: list[Path],
    method_name: str,
    out: Path,
    *,
    kd_data: Path | None = None,
    config: TrainConfig | None = None,
    progress: bool = True,
    accelerator: Accelerator | None = None,
) -> dict[str, Any]:
    """Train `method_name` through `task_files` on the host at `model_path`; results.json."""
    config = config or TrainConfig()
    if method_name not in METHOD_NAMES:
        raise ConfigError(f"unknown method {method_name!r}; valid: {', '.join(METHOD_NAMES)}")
    if not task_files:
        raise ConfigError("a run needs at least one task file")
    # Everything that can be checked without the model, before minutes of loading it.
    for file in [*task_files, *([kd_data] if kd_data else [])]:
        if not Path(file).is_file():
            raise ConfigError(f"{file}: file not found")
    names = [Path(f).stem for f in task_files]
    if len(set(names)) != len(names):
        raise ConfigError(f"task names (the files' stems) repeat: {names}")
    unknown = sorted(set(config.scoring) - set(names))
    if unknown:
        raise ConfigError(f"scoring names unknown tasks {unknown}; the tasks are {names}")
    if get_method(method_name).distill and kd_data is None:
        raise ConfigError(f"method {method_name!r} distils: give --kd-data with train pairs")
    accelerator = accelerator or default_accelerator()
    main = accelerator.is_main_process
    out = Path(out)
    run = {
        "model": str(model_path),
        "tasks": [str(f) for f in task_files],
        "method": method_name,
        "kd_data": None if kd_data is None else str(kd_data),
        "config": to_dict(config),
    }
    _check_resume(out, run)
    accelerator.wait_for_everyone()  # every process checked before the main one writes
    if main:
        write_atomic(out / "run.json", json.dumps(run, indent=1))
    model, tokenizer = load_host(model_path, config.host.dtype, accelerator.device)
    fmt = HostFormat.from_model(model, tokenizer)
    images = _image_reader(model, model_path, config, progress and main)
    images.load(out / "image_tokens.json")  # a resumed run tokenizes no image again
    tasks = [
        load_image_task(f, images, scoring=config.scoring.get(n))
        for f, n in zip(task_files, names, strict=True)
    ]
    if config.eval.max_test_samples is not None:
        for task in tasks:
            task.test = task.test[: config.eval.max_test_samples]
    pairs = None if kd_data is None else load_pairs(kd_data, images)
    if main:
        images.save(out / "image_tokens.json")
    method = get_method(method_name)
    method.setup(config.continual)
    if method.distill and not pairs.train:
        raise ConfigError(f"{kd_data}: method {method_name!r} distils, but it has no train pairs")
    torch.manual_seed(config.seed)
    attach_adapters(model, method.adapter_config(config.continual))
    if config.host.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    folder = out / "checkpoints"
    seed = config.seed
    watch = config.continual.monitor
    monitor = None
    if watch.enabled and pairs is not None and pairs.test:
        if accelerator.num_processes == 1:
            monitor = ConflictMonitor(fmt, pairs.test[: watch.probe_size], watch.every)
        elif main:
            warnings.warn("the conflict monitor runs in one process only: skipped", stacklevel=2)

    pre_file = folder / "pretrained" / "stage.json"
    accelerator.wait_for_everyone()  # every process sees the same files
    if not pre_file.exists():
        measures, answers, _ = measure(
            model, fmt, tasks, pairs, config, out / "images/pre", seed, accelerator
        )
        if main:
            save_stage(pre_file.parent, {**measures, "answers": answers}, model, method)
        accelerator.wait_for_everyone()
    pre = json.loads(pre_file.read_text())
    stages = []
    bar = tqdm(total=len(tasks), desc="stages", unit="stage", disable=not progress or not main)
    for k, task, stage_dir, saved in resumable(folder, tasks, model, method):
        if saved is not None:
            stages.append(saved)
            bar.update()
            continue
        start = time.perf_counter()
        log = train_task(
            model,
            fmt,
            method,
            task,
            config.continual,
            draw_pairs=pairs.train if pairs else (),
            seed=seed * 1000 + k,
            progress=progress,
            desc=f"{method_name} {k + 1}/{len(tasks)} {task.name}",
            accelerator=accelerator,
            monitor=monitor,
        )
        measures, answers, drawn = measure(
            model,
            fmt,
            tasks,
            pairs,
            config,
            out / "images" / stage_dir.name,
            seed * 1000 + k + 1,
            accelerator,
        )
        if main:
            entry = {
                "task": task.name,
                **measures,
                "answers": answers,
                "train_seconds": log["seconds"],
                "final_loss": float(np.mean(log["loss"][-5:])),
                "losses": log["loss"],  # per step: the task CE and, distilling, the KD
                "kd_losses": log["kd"],
                "wall_seconds": time.perf_counter() - start,
                "peak_memory_mb": peak_memory_mb(),
                "conflict": summarize_conflict(log["conflict"]) if monitor else None,
            }
            save_stage(stage_dir, entry, model, method, {"drawn.pt": drawn})
        accelerator.wait_for_everyone()  # written before any process reads it
        stages.append(json.loads((stage_dir / "stage.json").read_text()))
        bar.update()
    bar.close()
    results = summary(run, tasks, pre, stages)
    if main:
        write_atomic(out / "results.json", json.dumps(results, indent=1))
        write_train_report(out)
    return results


def summary(
    run: dict[str, Any], tasks: list[Task], pre: dict[str, Any], stages: list[dict[str, Any]]
) -> dict[str, Any]:
    """results.json: the accuracy matrix, its forgetting measures, and every stage."""
    matrix = [s["task_accuracy"] for s in stages]
    drop = ("task_accuracy", "answers")
    return {
        "schema": SCHEMA,
        **run,
        "task_names": [t.name for t in tasks],
        "scoring": {t.name: t.scoring for t in tasks},
        "pretrained": {k: v for k, v in pre.items() if k != "answers"},
        "accuracy_matrix": matrix,
        **summarize(matrix, pre["task_accuracy"]),
        "stages": [{k: v for k, v in s.items() if k not in drop} for s in stages],
    }
