"""The training loop, distillation wiring and every method, on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modecl.core.adapters import (
    adapters_off,
    attach_adapters,
    lm_logits,
    pass_kind,
    trainable_parameters,
)
from modecl.core.config import ConfigError, ContinualSettings, from_dict
from modecl.core.conflict import ConflictMonitor
from modecl.core.methods import METHOD_NAMES, get_method
from modecl.core.methods.distillation import distill_loss
from modecl.core.processes import Processes
from modecl.core.sequences import IGNORE, DrawPair, collate, next_token_loss
from modecl.core.tasks import Task
from modecl.core.train import check_engine, cosine_schedule, train_task, understand_loss
from modecl.digits.format import understand_example
from modecl.digits.model import build_model
from modecl.digits.tasks import DRAW_PROMPT
from tests.conftest import tiny_config
from tests.fixtures import deepspeed_accelerator

SETTINGS = from_dict(
    ContinualSettings,
    {
        "adapter": {"rank": 2, "num_experts": 2},
        "train": {"epochs": 1, "batch_size": 8, "max_train_samples": 16, "lr": 1e-2},
        "distill": {"batch_size": 4},
        "replay": {"buffer_size": 6, "per_batch": 3},
        "ewc": {"fisher_batches": 2, "fisher_batch_size": 4},
    },
)


@pytest.fixture(scope="module")
def two_tasks(digits):
    tasks = digits.tasks(["parity", "comparison"])
    return [Task(t.name, t.answers, t.train[:24], t.test[:8]) for t in tasks]


@pytest.fixture(scope="module")
def pairs(digits):
    codes = digits.codebook.encode(digits.pools.images[digits.pools.train[:20]])
    labels = digits.pools.labels[digits.pools.train[:20]]
    return [
        DrawPair(
            DRAW_PROMPT.format(
                ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][y]
            ),
            tuple(c),
        )
        for c, y in zip(codes, labels, strict=True)
    ]


def fresh_model(digits, seed=0):
    return build_model(digits.vocab, tiny_config().model, seed=seed)


def test_loss_covers_only_tokens_after_the_separator(digits, two_tasks):
    vocab = digits.vocab
    s = two_tasks[0].train[0]
    ex = understand_example(vocab, s.codes, s.question, s.answer)
    sep = ex.input_ids.index(vocab.sep_id)
    assert all(label == IGNORE for label in ex.labels[: sep + 1])
    assert ex.labels[sep + 1 :] == ex.input_ids[sep + 1 :]
    batch = collate([ex], vocab.pad_id)
    logits = torch.randn(1, len(ex.input_ids), len(vocab))
    expected = torch.nn.functional.cross_entropy(
        logits[0, sep:-1], torch.tensor(ex.input_ids[sep + 1 :])
    )
    assert torch.allclose(next_token_loss(logits, batch["labels"]), expected)
    changed = logits.clone()
    changed[0, :sep] = torch.randn(sep, len(vocab)) * 100  # predictions of prompt tokens
    assert torch.allclose(next_token_loss(changed, batch["labels"]), expected)
    changed[0, sep] += torch.randn(len(vocab))  # the prediction of the first answer token
    assert not torch.allclose(next_token_loss(changed, batch["labels"]), expected)


def test_kd_is_zero_at_init_and_the_teacher_is_the_host_without_a_copy(digits, pairs):
    model = fresh_model(digits)
    ids = torch.tensor(
        [
            [
                digits.vocab.bos_id,
                *digits.vocab.encode_words("draw a one"),
                digits.vocab.sep_id,
                digits.vocab.boi_id,
            ]
        ]
    )
    host_logits = model(input_ids=ids).logits
    n_params = sum(p.numel() for p in model.parameters())
    attach_adapters(model, get_method("mode").adapter_config(SETTINGS))
    adapter_params = sum(trainable_parameters(model).values())
    assert sum(p.numel() for p in model.parameters()) == n_params + adapter_params
    with torch.no_grad():  # perturb every adapter: the student now differs from the host
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
    with pass_kind(model, "teacher"):
        assert torch.equal(model(input_ids=ids).logits, host_logits)
    assert not torch.equal(model(input_ids=ids).logits, host_logits)
    fresh = fresh_model(digits)
    attach_adapters(fresh, get_method("mode").adapter_config(SETTINGS))
    assert distill_loss(fresh, digits.format, pairs[:4], SETTINGS.distill).item() == 0.0
    assert distill_loss(model, digits.format, pairs[:4], SETTINGS.distill).item() > 0.0


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_trains_two_tasks_end_to_end(digits, two_tasks, pairs, name):
    model = fresh_model(digits)
    method = get_method(name)
    method.configure(SETTINGS, pairs)
    attach_adapters(model, method.adapter_config(SETTINGS, len(two_tasks)))
    host = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for k, task in enumerate(two_tasks):
        log = train_task(
            model,
            digits.format,
            method,
            task,
            SETTINGS,
            seed=k,
            progress=False,
            index=k,
        )
        assert len(log["loss"]) == 2 and all(np.isfinite(log["loss"]))
        assert bool(log["terms"].get("kd")) == method.needs_pairs
    for n, p in model.named_parameters():
        if n in host:
            assert torch.equal(p, host[n]), f"host weight {n} changed"
    moved = [
        n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])
    ]
    assert moved, "no adapter parameter was trained"


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown method 'mode2'.*seq-lora"):
        get_method("mode2")


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_with_distance(digits, two_tasks):
    model = fresh_model(digits)
    method = get_method("ewc")
    method.configure(SETTINGS)
    attach_adapters(model, method.adapter_config(SETTINGS))

    def penalty(model):
        loss, weight = method.loss_terms(model, digits.format, None)["ewc"]
        return weight * loss

    assert method.loss_terms(model, digits.format, None) == {}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    method.after_task(model, two_tasks[0], lambda m, s: understand_loss(m, digits.format, s), 0)
    assert penalty(model).item() == 0.0
    trained = [p for p in model.parameters() if p.requires_grad]
    values = []
    for step in (0.01, 0.1, 1.0):
        with torch.no_grad():
            saved = [p.clone() for p in trained]
            for p in trained:
                p.add_(step)
            values.append(penalty(model).item())
            for p, s in zip(trained, saved, strict=True):
                p.copy_(s)
    assert 0 < values[0] < values[1] < values[2]


def test_replay_batches_contain_old_tasks_samples(digits, two_tasks):
    method = get_method("replay")
    method.configure(SETTINGS)
    rng = np.random.default_rng(0)
    first, second = two_tasks
    batch = second.train[:4]
    assert method.mix(list(batch), rng) == batch
    method.after_task(None, first, None, seed=0)
    mixed = method.mix(list(batch), rng)
    assert mixed[:4] == batch and len(mixed) == 4 + SETTINGS.replay.per_batch
    assert all(s in first.train for s in mixed[4:])
    method.after_task(None, second, None, seed=1)
    assert len(method.memory) == SETTINGS.replay.buffer_size
    assert {s.question for s in method.memory} == {
        first.train[0].question,
        second.train[0].question,
    }


def test_the_distillation_teacher_is_the_host_without_dropout(digits, pairs):
    """A host with attention dropout (Emu3's text config has 0.1) trains in train mode; the
    teacher's logits must still be the deterministic host's, and the mode is kept."""
    model = fresh_model(digits)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    attach_adapters(model, get_method("mode").adapter_config(SETTINGS))
    batch = collate([digits.format.draw_example(p) for p in pairs[:4]], digits.format.pad_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    model.train()
    torch.manual_seed(0)
    distill_loss(model, digits.format, pairs[:4], SETTINGS.distill)
    hook.remove()
    assert model.training
    model.eval()
    with torch.no_grad(), adapters_off(model):
        host = lm_logits(model, **inputs)
    assert torch.equal(seen[0], host)  # the first head call of the loss is the teacher's


def test_deepspeed_clips_at_train_grad_clip_and_sizes_its_batch_from_the_global_one():
    accelerator = deepspeed_accelerator(zero_stage=2)
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    assert config["gradient_clipping"] == "auto"  # accelerate would fill in 1.0
    check_engine(accelerator, SETTINGS)
    assert config["gradient_clipping"] == SETTINGS.train.grad_clip == 10.0
    assert config["train_micro_batch_size_per_gpu"] == 4  # a global batch of 8, 2 processes
    agreeing = deepspeed_accelerator(
        3, zero_stage=1, gradient_clipping=10.0, gradient_accumulation_steps=1
    )
    check_engine(agreeing, SETTINGS)
    assert agreeing.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 3
    check_engine(None, SETTINGS)  # no accelerator, nothing to check


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        ({"zero_stage": 3}, "ZeRO stage 3 is not supported"),
        ({"zero_stage": 0}, "ZeRO stage 0 is not supported"),
        ({"gradient_clipping": 1.0}, "gradient_clipping 1.0 differs from train.grad_clip 10.0"),
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps is 4"),
        (
            {"hf_ds_config": {"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}},
            "section 'optimizer': the training loop builds its own AdamW",
        ),
        (
            {"hf_ds_config": {"zero_optimization": {"stage": 2}, "scheduler": {"type": "LR"}}},
            "section 'scheduler'",
        ),
    ],
)
def test_a_deepspeed_config_the_loop_cannot_follow_is_refused(plugin, message):
    with pytest.raises(ConfigError, match=message):
        check_engine(deepspeed_accelerator(**plugin), SETTINGS)


def test_the_conflict_monitor_is_refused_under_deepspeed_even_in_one_process(
    digits, two_tasks, pairs
):
    """Its own backward passes set off DeepSpeed's gradient hooks (a ZeRO-2 run of one
    process failed so): refused before any step."""
    model = fresh_model(digits)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    monitor = ConflictMonitor(digits.format, pairs[:2], every=1)
    with pytest.raises(ValueError, match="single process without DeepSpeed only"):
        train_task(
            model,
            digits.format,
            get_method("seq-lora"),
            two_tasks[0],
            SETTINGS,
            progress=False,
            monitor=monitor,
            processes=Processes(deepspeed_accelerator(1, zero_stage=2)),
        )
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(("warmup", "total"), [(0, 7), (3, 17), (1, 1), (10, 10), (4, 100)])
def test_cosine_schedule_gives_transformers_learning_rates(warmup, total):
    from transformers import get_cosine_schedule_with_warmup

    lrs = []
    for make in (cosine_schedule, get_cosine_schedule_with_warmup):
        optim = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
        schedule, seen = make(optim, warmup, total), []
        for _ in range(total + 2):
            seen.append(optim.param_groups[0]["lr"])
            optim.step()
            schedule.step()
        lrs.append(seen)
    assert lrs[0] == lrs[1]
    assert lrs[0][0] == (0.0 if warmup else 3e-3)
    assert lrs[0][total] == (3e-3 if warmup == total else 0.0)
