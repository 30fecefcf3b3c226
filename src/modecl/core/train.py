"""The one training loop, shared by every method and every host.

Per task: AdamW (or SGD, ``train.optimizer``) over the adapter parameters, cosine schedule
with warm-up, gradient
clipping, seeded shuffling; optionally bfloat16 autocast (``train.mixed_precision``), the
adapters and the optimizer state staying float32. Each step's loss is

    CE(answer tokens | understand pass) + sum of the method's weighted loss terms

(:meth:`~modecl.core.methods.base.Method.loss_terms`: distillation from the adapters-off
teacher, EWC's penalty, O-LoRA's orthogonality); a method may then edit the gradient before
clipping (A-GEM's projection). Each forward tells the routing context what kind of pass it
is, and the adapters know the task in training (``training_task``). An
optional :class:`~modecl.core.conflict.ConflictMonitor` watches every k-th step (gradient
conflict between the CE and the image loss) without changing it.

Data parallel: given the run's :class:`~modecl.core.processes.Processes` of an
`accelerate.Accelerator` (DDP, DeepSpeed ZeRO-2), one step's loss is computed by a module
that the engine wraps; every process draws the same global batch (same seed) and takes its
share, ``batch[rank::count]``. The CE is summed over the process's answer tokens and divided
by the global batch's token count / the process count, so the gradient the engine averages
is exactly that of the global batch on one process.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from modecl.core.adapters import lm_logits, pass_kind, training_task
from modecl.core.config import ConfigError, ContinualSettings, TrainSettings
from modecl.core.conflict import ConflictMonitor, can_monitor
from modecl.core.files import atomic_dir
from modecl.core.methods.base import LossFn, Method
from modecl.core.processes import ONE_PROCESS, Processes, zero_stage
from modecl.core.sequences import (
    IGNORE,
    Format,
    collate,
    example_lengths,
    next_token_loss,
    understand,
)
from modecl.core.tasks import Sample, Task

Batch = dict[str, torch.Tensor]
_MICRO = "train_micro_batch_size_per_gpu"


@dataclass
class Progress:
    """Where this process's run is, for the line an interrupt prints: the runner sets the
    method and replicate (``where``) and the task (from 1), the training loop the steps
    done in the task."""

    where: str = ""
    task: int | None = None
    step: int = 0

    def interrupted(self) -> str:
        """The line that tells a user where the run stopped and that it can resume."""
        at = "" if self.task is None else f" at task {self.task}, step {self.step} ({self.where})"
        return f"interrupted{at}; run the same command to resume"


PROGRESS = Progress()


def understand_batch(fmt: Format, samples: Sequence[Sample], device: torch.device) -> Batch:
    batch = collate([understand(fmt, s) for s in samples], fmt.pad_id)
    return {k: v.to(device) for k, v in batch.items()}


def _understand_loss(
    model: nn.Module, batch: Batch, normalizer: torch.Tensor | None = None
) -> torch.Tensor:
    with pass_kind(model, "understand"):
        logits = lm_logits(
            model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
    return next_token_loss(logits, batch["labels"], normalizer)


def understand_loss(model: nn.Module, fmt: Format, samples: Sequence[Sample]) -> torch.Tensor:
    """Mean cross-entropy on the answer tokens of an understand pass over ``samples``."""
    return _understand_loss(model, understand_batch(fmt, samples, model.device))


class StepLoss(nn.Module):
    """One training step's loss as a module, so that a DDP / DeepSpeed engine can wrap it.

    Returns (total, task CE, {term: unweighted loss}); the CE keeps its graph for the
    conflict monitor.
    """

    def __init__(self, model: nn.Module, fmt: Format, method: Method) -> None:
        super().__init__()
        self.model, self.fmt, self.method = model, fmt, method

    def forward(
        self, task: Batch, inputs: Any, normalizer: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        ce = _understand_loss(self.model, task, normalizer)
        total, terms = ce, {}
        for name, (loss, weight) in self.method.loss_terms(self.model, self.fmt, inputs).items():
            total = total + weight * loss
            terms[name] = loss
        return total, ce, terms


def check_engine(
    accelerator: Accelerator | None, settings: ContinualSettings, methods: Sequence[Method] = ()
) -> None:
    """Refuse, before any work (a run's pre-flight), a DeepSpeed config that the loop cannot
    follow, and fill in what the loop decides where the config leaves it to us ("auto" or
    absent).

    DeepSpeed clips, steps and zeroes the gradients inside ``accelerator.backward``, at its
    config's ``gradient_clipping``: that is ``train.grad_clip``. The loop takes one optimizer
    step a batch (no accumulation). ZeRO stages 1 and 2 partition the optimizer state (and
    the gradients): each process ends every step with the whole of the adapters, which
    evaluation and drawing use unwrapped between tasks; stage 3 partitions the parameters
    themselves and is refused, as is stage 0 (plain data parallel: DDP does it). The
    per-process batch DeepSpeed sizes its engine by (usually read from a DataLoader) is
    the global batch's share; an ``optimizer`` or ``scheduler`` section is refused (the
    loop builds its own from the settings). A method that edits the step's gradient
    (A-GEM) is refused: DeepSpeed clips and steps inside its backward, and ZeRO-2 holds
    each process's partition of the gradient only. The reduce bucket waits for the model
    (:func:`size_reduce_bucket`).
    """
    stage = zero_stage(accelerator)
    if stage is None:
        return
    editing = [m.name for m in methods if m.edits_gradients]
    if editing:
        raise ConfigError(
            f"method {', '.join(editing)} projects each step's gradient, but DeepSpeed clips "
            "and steps inside its backward (and ZeRO-2 partitions the gradient over the "
            "processes), leaving no whole gradient to project; run it without DeepSpeed (DDP)"
        )
    cfg, config = settings.train, accelerator.state.deepspeed_plugin.deepspeed_config
    if stage not in (1, 2):
        raise ConfigError(
            f"DeepSpeed ZeRO stage {stage} is not supported: stages 1 and 2 are (stage 3 "
            "partitions the adapters that evaluation reads whole; without ZeRO, use DDP)"
        )
    clip = config.get("gradient_clipping", "auto")
    if clip == "auto":
        config["gradient_clipping"] = cfg.grad_clip
    elif float(clip) != cfg.grad_clip:
        raise ConfigError(
            f"DeepSpeed's gradient_clipping {clip} differs from train.grad_clip {cfg.grad_clip}: "
            "DeepSpeed does the clipping, make them equal"
        )
    own = [key for key in ("optimizer", "scheduler") if key in config]
    if own:
        raise ConfigError(
            f"the DeepSpeed config has a section {' and '.join(map(repr, own))}: the training "
            "loop builds its own AdamW and cosine schedule from [continual.train]; remove it"
        )
    accumulation = config.get("gradient_accumulation_steps", "auto")
    if accumulation not in ("auto", 1):
        raise ConfigError(
            f"DeepSpeed's gradient_accumulation_steps is {accumulation}: the training loop "
            "steps once a batch, set it to 1 (train.batch_size is the global batch)"
        )
    if config.get(_MICRO, "auto") == "auto":
        config[_MICRO] = -(-cfg.batch_size // accelerator.num_processes)


def size_reduce_bucket(accelerator: Accelerator | None, model: nn.Module) -> None:
    """Size an "auto" ZeRO reduce bucket as accelerate sizes it, hidden size squared, the
    hidden size read from ``model``'s input embeddings (accelerate reads
    ``model.config.hidden_size``: the loss module it wraps has no config, and Emu3 keeps it
    in its text config). Not a check: :func:`check_engine` passed before."""
    if zero_stage(accelerator) is None:
        return
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    if zero.get("reduce_bucket_size") == "auto":
        zero["reduce_bucket_size"] = model.get_input_embeddings().embedding_dim ** 2


def _cosine_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def cosine_schedule(optim: torch.optim.Optimizer, warmup: int, total: int) -> LambdaLR:
    """Linear warmup over ``warmup`` steps, then half a cosine down to 0 at step ``total``:
    the values of transformers' ``get_cosine_schedule_with_warmup``, whose import pulls in
    peft (seconds at every start of a process)."""
    return LambdaLR(optim, functools.partial(_cosine_factor, warmup=warmup, total=total))


def make_optimizer(params: Sequence[nn.Parameter], cfg: TrainSettings) -> torch.optim.Optimizer:
    """The optimizer ``train.optimizer`` names, at ``train.lr`` with ``train.weight_decay``:
    AdamW, plain SGD (a step is ``-lr * grad``) or SGD with ``train.momentum``."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    momentum = cfg.momentum if cfg.optimizer == "sgd-momentum" else 0.0
    return torch.optim.SGD(params, lr=cfg.lr, momentum=momentum, weight_decay=cfg.weight_decay)


GROUP_BATCHES = 50  # batches per run sorted by length (train.group_by_length)


def epoch_order(
    rng: np.random.Generator, lengths: np.ndarray, batch_size: int, grouped: bool
) -> np.ndarray:
    """One epoch's order of the samples, whose example lengths are `lengths`: a permutation
    drawn from `rng`; `grouped`, each run of ``GROUP_BATCHES`` batches of it sorted by
    length, longest first (as transformers' length-grouped sampler), so that a batch holds
    samples of similar length. The same in every process (the same `rng`); only the
    permutation is drawn from `rng`, grouped or not."""
    order = rng.permutation(len(lengths))
    if grouped:
        span = batch_size * GROUP_BATCHES
        for start in range(0, len(order), span):
            run = order[start : start + span]
            order[start : start + span] = run[np.argsort(-lengths[run], kind="stable")]
    return order


def steps_per_epoch(samples: int, batch_size: int, process_count: int) -> int:
    """Optimizer steps in an epoch of `samples`: a last batch with fewer samples than
    processes is dropped (every process needs one)."""
    return samples // batch_size + (samples % batch_size >= process_count)


def padding(
    lengths: np.ndarray, order: np.ndarray, batch_size: int, process_count: int, steps: int
) -> tuple[int, int]:
    """(padding tokens, batch tokens) of the first `steps` batches of `order`: each of
    `process_count` processes pads its share of a batch, ``batch[rank::process_count]``,
    to its longest."""
    pad = total = 0
    for step in range(steps):
        batch = lengths[order[step * batch_size : (step + 1) * batch_size]]
        for rank in range(process_count):
            share = batch[rank::process_count]
            if len(share):
                total += int(share.max()) * len(share)
                pad += int(share.max()) * len(share) - int(share.sum())
    return pad, total


def train_task(
    model: nn.Module,
    fmt: Format,
    method: Method,
    task: Task,
    settings: ContinualSettings,
    *,
    seed: int = 0,
    progress: bool = True,
    desc: str = "",
    monitor: ConflictMonitor | None = None,
    processes: Processes = ONE_PROCESS,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    checkpoint: Path | None = None,
    index: int = 0,
) -> dict:
    """Train the adapters of ``model`` on ``task``, task ``index`` of the sequence, with
    ``method`` (configured: :meth:`~modecl.core.methods.base.Method.configure`); returns a
    small log.

    With a ``monitor``, ``log["conflict"]`` holds its figures of each monitored step;
    ``on_step(step, values)`` receives each step's losses, learning rate and gradient norm
    (experiment tracking). With a ``checkpoint`` folder and ``train.checkpoint_every`` N > 0,
    the state after every N-th step is written there (atomically; the previous one is kept
    until the new one is complete), and a call that finds one resumes after that step with
    the same result as a run never interrupted (:class:`StepCheckpoint`). Under several
    ``processes``, each calls this with the same arguments (module doc); the logged losses
    are those of the global batch. Under DeepSpeed, :func:`check_engine` has passed (the
    run's pre-flight); the conflict monitor is for one process without DeepSpeed
    (:func:`~modecl.core.conflict.can_monitor`).
    """
    cfg = settings.train
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    samples = task.train
    if cfg.max_train_samples is not None:
        samples = [samples[i] for i in rng.permutation(len(samples))[: cfg.max_train_samples]]
    accelerator, count = processes.accelerator, processes.count
    if monitor is not None and not can_monitor(processes):
        raise ValueError("the conflict monitor runs in a single process without DeepSpeed only")
    if count > min(cfg.batch_size, len(samples)):
        raise ValueError(
            f"{count} processes need a batch of at least {count} samples "
            f"(train.batch_size {cfg.batch_size}, {len(samples)} samples in '{task.name}')"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    per_epoch = steps_per_epoch(len(samples), cfg.batch_size, count)
    total = per_epoch * cfg.epochs
    # Lengths only order the samples where batches are grouped by length.
    lengths = example_lengths(fmt, samples) if cfg.group_by_length else np.zeros(len(samples))
    optim = make_optimizer(params, cfg)
    schedule = cosine_schedule(optim, int(cfg.warmup_fraction * total), total)
    step_loss: nn.Module = StepLoss(model, fmt, method)
    if accelerator is not None:
        size_reduce_bucket(accelerator, model)
        step_loss, optim = accelerator.prepare(step_loss, optim)
    log: dict[str, Any] = {"loss": [], "terms": {}, "conflict": []}
    bf16 = cfg.mixed_precision == "bf16"  # autocast: matmuls in bfloat16, adapters float32
    saver = None
    if checkpoint is not None and cfg.checkpoint_every > 0:
        saver = StepCheckpoint(checkpoint, model, optim, schedule, rng, processes)
    first, order = 0, None
    if saver is not None and saver.exists():
        first, order, log = saver.load()
    PROGRESS.step = first
    start = time.perf_counter()
    model.train()
    loss_fn: LossFn = lambda m, s: understand_loss(m, fmt, s)  # noqa: E731
    bar = tqdm(
        total=total, desc=desc or task.name, disable=not progress or not processes.main, leave=False
    )
    # The adapters know the task in training (o-lora freezes earlier LoRAs), after it too;
    # the bar closes however the loop ends (an interrupt's line then comes after its last).
    with training_task(model, index), bar:
        bar.update(first)
        first_epoch, first_step = divmod(first, per_epoch)
        for epoch in range(first_epoch, cfg.epochs):
            if order is None or epoch > first_epoch or first_step == 0:  # else resumed mid-epoch
                order = epoch_order(rng, lengths, cfg.batch_size, cfg.group_by_length)
            for step in range(first_step if epoch == first_epoch else 0, per_epoch):
                picked = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                mine = processes.share(method.mix([samples[i] for i in picked], rng))
                batch = understand_batch(fmt, mine, model.device)
                inputs = method.step_inputs(rng, processes)
                normalizer = None
                if count > 1:
                    tokens = (batch["labels"][:, 1:] != IGNORE).sum()
                    normalizer = accelerator.reduce(tokens, "sum") / count
                with torch.autocast(model.device.type, torch.bfloat16, enabled=bf16):
                    loss, ce, terms = step_loss(batch, inputs, normalizer)
                n = epoch * per_epoch + step
                watched = monitor is not None and monitor.due(n)
                if watched:
                    monitor.before(model, ce, lr=optim.param_groups[0]["lr"])
                optim.zero_grad(set_to_none=True)
                lr = optim.param_groups[0]["lr"]
                if accelerator is not None:
                    # Under DeepSpeed, backward also clips (at train.grad_clip: check_engine),
                    # steps and zeroes; the norm is then its step's, the optimizer's step a no-op.
                    accelerator.backward(loss)
                else:
                    loss.backward()
                with torch.autocast(model.device.type, torch.bfloat16, enabled=bf16):
                    edits = method.edit_gradients(model, params, inputs, loss_fn)
                if accelerator is None:
                    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                else:
                    norm = accelerator.clip_grad_norm_(params, cfg.grad_clip)
                optim.step()
                if watched:
                    log["conflict"].append({"step": n, **monitor.after(model)})
                schedule.step()
                if count > 1:
                    ce = accelerator.reduce(ce.detach(), "mean")
                    terms = {k: accelerator.reduce(v.detach(), "mean") for k, v in terms.items()}
                log["loss"].append(ce.item())
                for name, value in terms.items():
                    log["terms"].setdefault(name, []).append(value.item())
                for name, value in edits.items():
                    log["terms"].setdefault(name, []).append(value)
                if on_step is not None:
                    values = {"loss/ce": ce.item(), "lr": lr}
                    values |= {f"loss/{k}": v.item() for k, v in terms.items()}
                    on_step(n, values | {"grad_norm": float(norm)})
                bar.update()
                bar.set_postfix(loss=f"{ce.item():.3f}")
                PROGRESS.step = n + 1
                if saver is not None and (n + 1) % cfg.checkpoint_every == 0 and n + 1 < total:
                    saver.save(n + 1, order, log)
        if accelerator is not None:
            accelerator.free_memory()  # drop this task's engine and optimizer wrappers
        model.eval()
        method.after_task(model, task, loss_fn, seed=seed, fmt=fmt)
    log["seconds"] = time.perf_counter() - start
    return log


class StepCheckpoint:
    """The state inside a task after a step: adapters, optimizer (under ZeRO, every
    process's partition of it), schedule, every random number generator (numpy's data
    order, torch's of every process), the epoch's order, the position and the log so far,
    in ``folder/state.pt``, written atomically."""

    def __init__(
        self,
        folder: Path,
        model: nn.Module,
        optim: torch.optim.Optimizer,
        schedule: Any,
        rng: np.random.Generator,
        processes: Processes,
    ) -> None:
        self.folder, self.model, self.optim, self.schedule = folder, model, optim, schedule
        self.rng, self.processes = rng, processes

    def exists(self) -> bool:
        return (self.folder / "state.pt").exists()

    def save(self, position: int, order: np.ndarray, log: dict[str, Any]) -> None:
        torch_rng = self.processes.gather([torch.get_rng_state()])
        optimizer = self.optim.state_dict()
        if self.processes.count > 1 and self.processes.zero_stage:  # each holds its own part
            optimizer = self.processes.gather([optimizer])
        if self.processes.main:
            state = {
                "position": position,
                "order": order,
                "log": log,
                "adapters": {
                    n: p.detach().clone()
                    for n, p in self.model.named_parameters()
                    if p.requires_grad
                },
                "optimizer": optimizer,
                "schedule": self.schedule.state_dict(),
                "rng": self.rng.bit_generator.state,
                "torch_rng": torch_rng,
            }
            with atomic_dir(self.folder) as tmp, (tmp / "state.pt").open("wb") as file:
                torch.save(state, file)  # to a file: a full disk raises OSError, not torch's
        self.processes.barrier()

    def load(self) -> tuple[int, np.ndarray, dict[str, Any]]:
        """Put the saved state back; returns (the next step, the epoch's order, the log)."""
        state = torch.load(self.folder / "state.pt", weights_only=False)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["adapters"].items():
                params[name].copy_(value)
        # ZeRO's optimizer takes the list of every process's part and picks its own.
        self.optim.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"][self.processes.rank])
        return state["position"], state["order"], state["log"]
