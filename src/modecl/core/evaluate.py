"""Evaluation: scored and answer-set-constrained accuracy, drawing, image-token NLL.

An accuracy is the mean credit of a task's test answers (:func:`credit`): a share of right
answers, or the mean VQA soft accuracy under the `vqa` rule."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from modecl.core.adapters import (
    has_adapters,
    lm_logits,
    pass_kind,
    routed_weights,
    router_entropy,
)
from modecl.core.generation import generate
from modecl.core.scoring import score
from modecl.core.sequences import (
    DrawPair,
    Format,
    collate,
    grow_mask,
    left_padded,
    padding_inputs,
    understand,
)
from modecl.core.tasks import Sample, Task

__all__ = [
    "DrawPair",
    "answer",
    "answer_log_likelihoods",
    "answer_set",
    "constrained_choices",
    "credit",
    "exact_accuracy",
    "image_code_nll",
    "image_nll",
    "image_nll_terms",
    "pass_if_adapted",
    "router_summary",
    "router_use",
    "scored_accuracy",
]


def pass_if_adapted(model: torch.nn.Module, kind: str) -> AbstractContextManager:
    """Tell attached adapters which pass runs (a host without adapters needs nothing)."""
    return pass_kind(model, kind) if has_adapters(model) else nullcontext()


def _next_token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label t+1 | prefix) at every position; ``labels`` are already shifted left."""
    logp = logits[:, :-1].log_softmax(-1)
    return logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)


@torch.no_grad()
def answer(
    model: torch.nn.Module,
    fmt: Format,
    samples: Sequence[Sample],
    max_new_tokens: int = 4,
    batch_size: int = 256,
) -> list[str]:
    """Greedy-decoded answers to ``samples``' questions, in batches of similar length.

    Answer tokens are restricted to ``fmt.answer_allowed`` (Chameleon: no image code).
    """
    prompts = [fmt.prompt(s) for s in samples]
    out: list[str] = [""] * len(samples)
    allowed = fmt.answer_allowed(model.get_output_embeddings().out_features)
    for index, ids, mask in left_padded(prompts, fmt.pad_id, batch_size):
        padded = {} if mask is None else {"attention_mask": mask.to(model.device)}
        with pass_if_adapted(model, "understand"):
            tokens = generate(
                model,
                ids.to(model.device),
                max_new_tokens,
                allowed=allowed,
                eos_id=fmt.eos_id,
                **padded,
            )
        for i, row in zip(index, tokens.tolist(), strict=True):
            out[i] = fmt.decode(row)
    return out


def exact_accuracy(model: torch.nn.Module, fmt: Format, samples: Sequence[Sample]) -> float:
    """Share of samples whose greedy answer equals the reference exactly."""
    if not samples:
        return float("nan")
    predicted = answer(model, fmt, samples)
    return float(np.mean([p == s.answer for p, s in zip(predicted, samples, strict=True)]))


def credit(task: Task, sample: Sample, prediction: str) -> float:
    """The credit in [0, 1] of ``prediction`` for ``sample`` under ``task.scoring``."""
    return score(prediction, sample.answer, task.scoring, sample.options, sample.answers)


def scored_accuracy(task: Task, answers: Sequence[str]) -> float:
    """Mean credit of ``answers`` (one per sample of ``task.test``) under ``task.scoring``."""
    if not task.test:
        return float("nan")
    pairs = zip(answers, task.test, strict=True)
    return float(np.mean([credit(task, s, a) for a, s in pairs]))


def _continuation_log_prob(
    model: torch.nn.Module,
    cache: DynamicCache,
    first: torch.Tensor,
    tail: list[int],
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """log p(tail | prompt) per row, from the prompt's cache and its last log-probs ``first``.

    The tail's tokens but the last are fed after the prompt, then cropped off the cache.
    """
    score = first[:, tail[0]]
    if len(tail) == 1:
        return score
    fed = torch.tensor(tail[:-1]).expand(len(first), -1)
    padding = padding_inputs(grow_mask(mask, fed.shape[1]), fed.shape[1])
    logits = model(input_ids=fed, cache=cache, use_cache=True, **padding).logits.float()
    targets = torch.tensor(tail[1:]).expand(len(first), -1)
    picked = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    cache.crop(-fed.shape[1])  # a negative count removes that many from the end
    return score + picked.sum(-1)


@torch.no_grad()
def answer_log_likelihoods(
    model: torch.nn.Module,
    fmt: Format,
    samples: Sequence[Sample],
    candidates: Sequence[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """``[len(samples), len(candidates)]`` log p(candidate words + <eos> | prompt).

    Each batch of prompts runs once; every candidate continues from its KV cache.
    """
    scores = torch.empty(len(samples), len(candidates))
    prompts = [fmt.prompt(s) for s in samples]
    tails = [fmt.answer_ids(c) for c in candidates]
    for index, ids, mask in left_padded(prompts, fmt.pad_id, batch_size):
        cache = DynamicCache(config=model.config)
        padding = padding_inputs(mask, ids.shape[1])
        with pass_if_adapted(model, "understand"):
            out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1, **padding)
            first = out.logits[:, -1].float().log_softmax(-1)
            for c, tail in enumerate(tails):
                scores[index, c] = _continuation_log_prob(model, cache, first, tail, mask)
    return scores


def answer_set(task: Task, sample: Sample) -> tuple[str, ...] | None:
    """The closed set ``sample``'s answer is chosen from: its options, else the task's
    declared answers; None for an open-ended question."""
    return sample.options or task.answers or None


def constrained_choices(
    model: torch.nn.Module,
    fmt: Format,
    samples: Sequence[Sample],
    answer_sets: Sequence[tuple[str, ...]],
    batch_size: int = 256,
) -> list[str]:
    """Each sample's most likely answer among its answer set (the first on a tie)."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, candidates in enumerate(answer_sets):
        groups.setdefault(candidates, []).append(i)
    picks = [""] * len(samples)
    for candidates, index in groups.items():
        scores = answer_log_likelihoods(
            model, fmt, [samples[i] for i in index], candidates, batch_size
        )
        for i, best in zip(index, scores.argmax(-1).tolist(), strict=True):
            picks[i] = candidates[best]
    return picks


@torch.no_grad()
def image_nll(
    model: torch.nn.Module, fmt: Format, pairs: Sequence[DrawPair], batch_size: int = 256
) -> float:
    """Teacher-forced mean negative log-likelihood of the image codes of (prompt, image) pairs."""
    total, count = image_nll_terms(model, fmt, pairs, batch_size)
    return total / max(count, 1)


@torch.no_grad()
def image_nll_terms(
    model: torch.nn.Module, fmt: Format, pairs: Sequence[DrawPair], batch_size: int = 256
) -> tuple[float, int]:
    """(summed NLL, number of image codes) of ``pairs``: shares of a split set add up."""
    total, count = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        batch = collate(
            [fmt.draw_example(p) for p in pairs[start : start + batch_size]], fmt.pad_id
        )
        nll, codes = image_code_nll(model, fmt, batch)
        total, count = total + float(nll), count + codes
    return total, count


def image_code_nll(
    model: torch.nn.Module, fmt: Format, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """Summed teacher-forced NLL of the image codes of a collated draw batch (a draw pass,
    differentiable), and how many codes it covers."""
    batch = {k: v.to(model.device) for k, v in batch.items()}
    with pass_if_adapted(model, "draw"):
        logits = lm_logits(
            model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).float()
    labels = batch["labels"][:, 1:]
    is_code = fmt.is_image_code(labels)
    return -(_next_token_log_probs(logits, labels) * is_code).sum(), int(is_code.sum())


RouterSums = dict[str, tuple[list[float], float, int]]


def router_use(
    model: torch.nn.Module, fmt: Format, samples: Sequence[Sample], batch_size: int = 256
) -> RouterSums:
    """Per layer with a router, over the routed tokens of ``samples``' understand sequences
    (question and answer, padding left out): the router weights summed per expert, the
    normalized entropies summed, and the token count. Sums, so that shards add up."""
    sums: RouterSums = {}
    for start in range(0, len(samples), batch_size):
        batch = collate(
            [understand(fmt, s) for s in samples[start : start + batch_size]], fmt.pad_id
        )
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.no_grad(), pass_kind(model, "understand"):
            lm_logits(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for name, weights in routed_weights(model, batch["attention_mask"]).items():
            shares, entropy, count = sums.get(name, ([0.0] * weights.shape[-1], 0.0, 0))
            shares = [a + b for a, b in zip(shares, weights.sum(0).tolist(), strict=True)]
            entropy += router_entropy(weights).sum().item()
            sums[name] = (shares, entropy, count + len(weights))
    return sums


def router_summary(parts: Sequence[RouterSums]) -> dict[str, Any]:
    """The mean expert share and normalized entropy per layer, and their means over layers,
    from the sums of one or more shards (:func:`router_use`)."""
    total: RouterSums = {}
    for part in parts:
        for name, (shares, entropy, count) in part.items():
            before = total.get(name, ([0.0] * len(shares), 0.0, 0))
            added = [a + b for a, b in zip(before[0], shares, strict=True)]
            total[name] = (added, before[1] + entropy, before[2] + count)
    layers = {
        name: {"shares": [v / count for v in shares], "entropy": entropy / count}
        for name, (shares, entropy, count) in total.items()
        if count
    }
    if not layers:
        return {"shares": None, "entropy": None, "layers": {}}
    shares = np.mean([layer["shares"] for layer in layers.values()], axis=0).tolist()
    entropy = float(np.mean([layer["entropy"] for layer in layers.values()]))
    return {"shares": shares, "entropy": entropy, "layers": layers}
