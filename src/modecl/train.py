"""The one training loop, shared by every method.

Per task: AdamW over the adapter parameters, cosine schedule with warm-up, gradient
clipping, seeded shuffling. Each step's loss is

    CE(answer tokens | understand pass)
    + lambda * KL_topK(teacher || student) on a batch of image-generation pairs  (if distilling)
    + the method's penalty (EWC)

The teacher is the same model with the adapters off; each forward tells the routing
context what kind of pass it is. An optional :class:`~modecl.conflict.ConflictMonitor`
watches every k-th step (gradient conflict between the CE and the image loss) without
changing it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from modecl.adapters import lm_logits, pass_kind
from modecl.config import ContinualSettings, DistillSettings
from modecl.conflict import ConflictMonitor
from modecl.distill import kd_mask, topk_kl
from modecl.evaluate import DrawPair
from modecl.methods.base import Method
from modecl.sequences import collate, draw_example, next_token_loss, understand_example
from modecl.tasks import Sample, Task
from modecl.vocab import Vocabulary


def understand_loss(model: torch.nn.Module, vocab: Vocabulary, samples: Sequence[Sample]):
    """Cross-entropy on the answer tokens (after the separator) of an understand pass."""
    batch = collate(
        [understand_example(vocab, s.codes, s.question, s.answer) for s in samples], vocab.pad_id
    )
    with pass_kind(model, "understand"):
        logits = lm_logits(
            model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
    return next_token_loss(logits, batch["labels"])


def distill_loss(
    model: torch.nn.Module, vocab: Vocabulary, pairs: Sequence[DrawPair], settings: DistillSettings
) -> torch.Tensor:
    """Top-K KL(teacher || student) over a batch of image-generation pairs."""
    batch = collate([draw_example(vocab, p.prompt, p.codes) for p in pairs], vocab.pad_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad(), pass_kind(model, "teacher"):
        teacher = lm_logits(model, **inputs)
    with pass_kind(model, "student"):
        student = lm_logits(model, **inputs)
    # Logits at t predict token t+1: distil the predictions of the image tokens.
    next_is_image = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    next_is_image[:, :-1] = vocab.image_mask(batch["input_ids"][:, 1:])
    mask = kd_mask(next_is_image, batch["attention_mask"], average_over=settings.average_over)
    return topk_kl(
        teacher,
        student,
        mask,
        temperature=settings.temperature,
        top_k=settings.top_k,
        chunk_size=settings.chunk_size,
    )


def train_task(
    model: torch.nn.Module,
    vocab: Vocabulary,
    method: Method,
    task: Task,
    settings: ContinualSettings,
    *,
    draw_pairs: Sequence[DrawPair] = (),
    seed: int = 0,
    progress: bool = True,
    desc: str = "",
    monitor: ConflictMonitor | None = None,
) -> dict:
    """Train the adapters of ``model`` on ``task`` with ``method``; returns a small log.

    With a ``monitor``, ``log["conflict"]`` holds its figures of each monitored step.
    """
    cfg = settings.train
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    samples = task.train
    if cfg.max_train_samples is not None:
        samples = [samples[i] for i in rng.permutation(len(samples))[: cfg.max_train_samples]]
    if method.distill and not draw_pairs:
        raise ValueError(f"method '{method.name}' distils but no image-generation pairs were given")
    params = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = math.ceil(len(samples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optim, int(cfg.warmup_fraction * total), total)
    log = {"loss": [], "kd": [], "conflict": []}
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=total, desc=desc or task.name, disable=not progress, leave=False)
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(samples))
        for step in range(steps_per_epoch):
            index = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            batch = method.mix([samples[i] for i in index], rng)
            loss = understand_loss(model, vocab, batch)
            total_loss = loss
            if method.distill:
                pick = rng.choice(len(draw_pairs), settings.distill.batch_size, replace=False)
                kd = distill_loss(model, vocab, [draw_pairs[i] for i in pick], settings.distill)
                total_loss = total_loss + settings.distill.weight * kd
                log["kd"].append(kd.item())
            penalty = method.penalty(model)
            if penalty is not None:
                total_loss = total_loss + penalty
            n = epoch * steps_per_epoch + step
            watched = monitor is not None and monitor.due(n)
            if watched:
                monitor.before(model, loss, lr=optim.param_groups[0]["lr"])
            optim.zero_grad(set_to_none=True)
            total_loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optim.step()
            if watched:
                log["conflict"].append({"step": n, **monitor.after(model)})
            schedule.step()
            log["loss"].append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    method.after_task(model, task, lambda m, s: understand_loss(m, vocab, s), seed=seed)
    log["seconds"] = time.perf_counter() - start
    return log
