"""Pre-training the tiny UMGM from random init, cached on disk, gated on competence.

Four streams, mixed and shuffled every epoch (all from the pre-training pool):

- draw: "draw a seven" -> <boi> codes <eoi> (clean targets: noise there hurts drawing);
- captioning: <boi> codes <eoi> "what digit is this" -> "seven", on images augmented by
  random 1-pixel shifts and pixel noise, with the loss also on the image codes;
- text: plain statements that use every word of the vocabulary, so every answer word has
  a trained embedding before any continual task needs it;
- instruction preview: each built-in task's question on images of a few digits only, so
  the base model follows every question format with partial skill.

Checkpoint selection uses the validation part of the pre-training pool, never the test
pool. The result is cached under :func:`cache_key` (the config, the digits' texts and
FORMAT_VERSION): a second run loads in seconds. The default hosts of seeds 0, 1 and 2
ship with the package (:mod:`modecl.digits.shipped`) and are taken before the cache.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

from modecl.core.config import to_dict
from modecl.core.files import atomic_dir, remove_leftovers
from modecl.core.sequences import Example, collate, next_token_loss
from modecl.core.train import cosine_schedule
from modecl.digits import data, shipped, tasks
from modecl.digits.codebook import Codebook
from modecl.digits.config import DigitsConfig, PretrainConfig
from modecl.digits.format import draw_example, text_example, understand_example
from modecl.digits.host import Digits
from modecl.digits.model import build_model
from modecl.digits.vocab import SPECIALS

# Bump when code changes what pre-training learns beyond the config and the digits' texts
# (the streams, the token format, the model): it retires every cached host.
FORMAT_VERSION = 1


class GateError(RuntimeError):
    """The pre-trained model is not competent enough to start continual learning."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("MODECL_CACHE", Path.home() / ".cache" / "modecl"))


def cache_key(config: DigitsConfig) -> str:
    """Hash of what shapes the pre-trained host: the config (not its sampling settings; the
    gate too, since checkpoints are ranked by their margin to it), the digits' texts
    (vocabulary words, questions, templates, statements) and FORMAT_VERSION."""
    settings = {k: v for k, v in to_dict(config).items() if k != "generation"}
    texts = {
        "words": tasks.words(),
        "specials": list(SPECIALS),
        "digit_words": list(data.DIGIT_WORDS),
        "number_words": list(tasks.NUMBER_WORDS),
        "caption_question": tasks.CAPTION_QUESTION,
        "draw_prompt": tasks.DRAW_PROMPT,
        "tasks": {name: [rule.question, *rule.answers] for name, rule in tasks.TASK_RULES.items()},
        "statements": tasks.statements(),
    }
    keyed = {"format_version": FORMAT_VERSION, "config": settings, "texts": texts}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def augment(images: np.ndarray, rng: np.random.Generator, shift_prob: float, noise: float):
    """Random 1-pixel shifts (with probability ``shift_prob``) and Gaussian pixel noise."""
    out = images.copy()
    for i in np.flatnonzero(rng.random(len(images)) < shift_prob):
        axis = int(rng.integers(1, 3))
        out[i] = np.roll(out[i], int(rng.choice([-1, 1])), axis=axis - 1)
    out += rng.normal(0.0, noise, size=out.shape).astype(np.float32)
    return np.clip(out, 0.0, 16.0)


def epoch_examples(digits: Digits, rng: np.random.Generator, preview) -> list[Example]:
    cfg, pools, vocab = digits.config.pretrain, digits.pools, digits.vocab
    index = pools.pretrain
    labels = pools.labels[index]
    clean = digits.codebook.encode(pools.images[index])
    copies = np.concatenate([pools.images[index]] * cfg.caption_copies)
    noisy = digits.codebook.encode(augment(copies, rng, cfg.shift_prob, cfg.noise_std))
    examples = [
        draw_example(vocab, tasks.DRAW_PROMPT.format(data.DIGIT_WORDS[y]), c)
        for c, y in zip(clean, labels, strict=True)
    ]
    examples += [
        understand_example(
            vocab, c, tasks.CAPTION_QUESTION, data.DIGIT_WORDS[y], loss_on_prompt_codes=True
        )
        for c, y in zip(noisy, np.tile(labels, cfg.caption_copies), strict=True)
    ]
    examples += [text_example(vocab, s) for s in tasks.statements()]
    if preview:
        take = rng.choice(len(preview), preview_count(cfg, preview), replace=False)
        examples += [
            understand_example(vocab, preview[i].codes, preview[i].question, preview[i].answer)
            for i in take
        ]
    return [examples[i] for i in rng.permutation(len(examples))]


def preview_count(cfg: PretrainConfig, preview: list) -> int:
    return min(len(preview), cfg.preview_per_task * len(tasks.TASK_RULES))


def skill_scores(
    digits: Digits, model: torch.nn.Module, pool: np.ndarray, per_digit: int, seed: int
) -> tuple[float, float]:
    """(captioning accuracy on ``pool``, generation accuracy of ``per_digit`` drawings per
    digit, sampled with ``seed``)."""
    captioning = digits.captioning_accuracy(model, pool)
    codes, labels = digits.draw_digits(model, per_digit, seed)
    return captioning, digits.generation_accuracy(codes, labels)


def validation_scores(digits: Digits, model: torch.nn.Module, seed: int) -> tuple[float, float]:
    """(captioning, generation) accuracy on the validation part of the pre-training pool."""
    return skill_scores(digits, model, digits.pools.pretrain_val, 10, seed)


def train_host(digits: Digits, progress: bool = True) -> tuple[LlamaForCausalLM, dict]:
    """Pre-train from random init; returns the validation-selected model and a log."""
    cfg, gate, seed = digits.config.pretrain, digits.config.gate, digits.config.seed
    model = build_model(digits.vocab, digits.config.model, seed)
    rng = np.random.default_rng(seed)
    preview = tasks.preview_samples(
        digits.pools, digits.codebook, cfg.preview_digits, digits.config.spatial_margin
    )
    epoch_size = (
        (1 + cfg.caption_copies) * len(digits.pools.pretrain)
        + len(tasks.statements())
        + preview_count(cfg, preview)
    )
    steps_per_epoch = -(-epoch_size // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = cosine_schedule(optim, int(cfg.warmup_fraction * total), total)
    # An exponential moving average of the weights: captioning accuracy of the raw weights
    # swings by several points from one epoch to the next; the average is steadier.
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
    best: tuple[float, int, dict] | None = None
    history = []
    bar = tqdm(range(cfg.epochs), desc="pre-training", disable=not progress, unit="epoch")
    for epoch in bar:
        model.train()
        examples = epoch_examples(digits, rng, preview)
        losses = []
        for start in range(0, len(examples), cfg.batch_size):
            batch = collate(examples[start : start + cfg.batch_size], digits.vocab.pad_id)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            loss = next_token_loss(logits, batch["labels"])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            schedule.step()
            ema.update_parameters(model)
            losses.append(loss.item())
        model.eval()
        ema.eval()
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses))}
        if epoch + 1 >= cfg.eval_from_epoch and (
            (epoch + 1 - cfg.eval_from_epoch) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
        ):
            captioning, generation = validation_scores(digits, ema.module, seed)
            entry |= {"val_captioning": captioning, "val_generation": generation}
            # The margin to the nearer gate ranks checkpoints: both skills must hold.
            score = min(captioning - gate.captioning, generation - gate.generation)
            if best is None or score > best[0]:
                best = (score, epoch + 1, copy.deepcopy(ema.module.state_dict()))
        history.append(entry)
        bar.set_postfix({k: round(v, 3) for k, v in entry.items() if k != "epoch"})
    assert best is not None  # the last epoch is always evaluated
    model.load_state_dict(best[2])
    return model.eval(), {"selected_epoch": best[1], "history": history}


@dataclass
class PretrainedHost:
    digits: Digits
    model: LlamaForCausalLM
    # selected epoch, per-epoch history, seconds, kernel path, source: "shipped", "cache"
    # or "trained"
    log: dict
    folder: Path  # where its files are: the shipped host's, or the cache entry

    def identity(self) -> dict:
        """What identifies it in results.json: host seed, config hash (the cache key), the
        CPU kernel path it was pre-trained under, its weights' SHA-256 and whether it is a
        shipped host (else pre-trained on this machine, now or earlier)."""
        return {
            "seed": self.digits.config.seed,
            "config_hash": cache_key(self.digits.config),
            "kernel_path": self.log.get("kernel_path"),
            "weights_sha256": shipped.sha256(self.folder / "model" / "model.safetensors"),
            "shipped": self.log["source"] == "shipped",
        }

    def gate_scores(self) -> tuple[float, float]:
        """What the gate judges (:func:`check_gate`): captioning accuracy on the test pool,
        and the generation accuracy of ``generation.samples_per_digit`` drawings per digit
        (sampled with the host's seed)."""
        digits, config = self.digits, self.digits.config
        per_digit = config.generation.samples_per_digit
        return skill_scores(digits, self.model, digits.pools.test, per_digit, config.seed)


def _load(config: DigitsConfig, folder: Path, source: str) -> PretrainedHost:
    start = time.perf_counter()
    digits = Digits.build(config, Codebook.load(folder / "codebook.npy"))
    model = LlamaForCausalLM.from_pretrained(folder / "model").eval()
    log = json.loads((folder / "log.json").read_text())
    log |= {"cached": True, "source": source, "load_seconds": time.perf_counter() - start}
    return PretrainedHost(digits, model, log, folder)


def load_or_pretrain(
    config: DigitsConfig,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    use_shipped: bool = True,
) -> PretrainedHost:
    """The pre-trained host for ``config``: the shipped one (checked against its manifest),
    else loaded from the cache, else trained and cached.

    Args:
        config: the host's settings.
        cache_dir: the cache (default: ``$MODECL_CACHE`` or ``~/.cache/modecl``).
        progress: show the pre-training bar.
        use_shipped: False to ignore the shipped hosts (to re-create one, or to time
            pre-training).
    """
    key = cache_key(config)
    found = shipped.find(key) if use_shipped else None
    if found is not None:
        shipped.verify(found)
        return _load(config, found, "shipped")
    folder = Path(cache_dir or default_cache_dir()) / f"digits-{key}"
    if (folder / "log.json").exists():
        return _load(config, folder, "cache")
    start = time.perf_counter()
    digits = Digits.build(config)
    model, log = train_host(digits, progress)
    log |= {
        "seconds": time.perf_counter() - start,
        "kernel_path": torch.backends.cpu.get_cpu_capability(),
        "config": to_dict(config),
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder.parent)  # of a pre-training that was killed while saving
    with atomic_dir(folder) as tmp:  # a half-written folder from a crash is replaced whole
        digits.codebook.save(tmp / "codebook.npy")
        digits.vocab.save(tmp / "vocab.json")
        model.save_pretrained(tmp / "model")
        (tmp / "log.json").write_text(json.dumps(log, indent=1))
    return PretrainedHost(digits, model, log | {"cached": False, "source": "trained"}, folder)


def check_gate(config: DigitsConfig, captioning: float, generation: float) -> None:
    """Raise :class:`GateError` naming each skill below its threshold and by how much."""
    failures = [
        f"{name} accuracy {value:.3f} < {threshold:.3f} (short by {threshold - value:.3f})"
        for name, value, threshold in (
            ("captioning", captioning, config.gate.captioning),
            ("generation", generation, config.gate.generation),
        )
        if value < threshold
    ]
    if failures:
        raise GateError(
            "the pre-trained model failed the competence gate: "
            + "; ".join(failures)
            + ". Pre-train longer or with more capacity (config [pretrain]/[model]),"
            " or lower [gate] thresholds knowingly."
        )
