"""Configuration loading: the shipped config documents the defaults; errors name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from modecl.cli import main
from modecl.core.config import ConfigError, from_dict, load_toml, to_dict
from modecl.core.methods import METHOD_NAMES, get_method
from modecl.core.runner import check_methods
from modecl.digits import data, pretrain, tasks
from modecl.digits.config import DigitsConfig, RunConfig
from modecl.digits.pretrain import cache_key
from modecl.digits.tasks import TaskRule
from modecl.hosts.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_equals_the_built_in_defaults():
    assert to_dict(load_toml(RunConfig, ROOT / "configs" / "digits.toml")) == to_dict(RunConfig())


def test_missing_file_and_bad_toml_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: file not found"):
        load_toml(RunConfig, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[host\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_toml(RunConfig, bad)


def test_cache_key_follows_what_shapes_the_weights():
    base = cache_key(DigitsConfig())
    assert base == cache_key(DigitsConfig())
    assert cache_key(DigitsConfig(seed=1)) != base
    gate_only = DigitsConfig()  # the gate ranks the checkpoints: it shapes the weights
    gate_only.gate.captioning = 0.5
    assert cache_key(gate_only) != base
    sampling_only = DigitsConfig()  # how the host draws does not
    sampling_only.generation.temperature = 0.5
    assert cache_key(sampling_only) == base


def _renamed_rule(rule: str, question: str) -> dict[str, TaskRule]:
    rules = dict(tasks.TASK_RULES)
    rules[rule] = dataclasses.replace(rules[rule], question=question)
    return rules


@pytest.mark.parametrize(
    ("module", "name", "value"),
    [
        (data, "DIGIT_WORDS", ("nil", *data.DIGIT_WORDS[1:])),
        (tasks, "DIGIT_WORDS", ("nil", *data.DIGIT_WORDS[1:])),
        (tasks, "NUMBER_WORDS", (*tasks.NUMBER_WORDS[:-1], "dozen")),
        (tasks, "CAPTION_QUESTION", "which digit is shown"),
        (tasks, "DRAW_PROMPT", "paint a {}"),
        (tasks, "TASK_RULES", _renamed_rule("parity", "is this digit odd or even")),
        (pretrain, "FORMAT_VERSION", pretrain.FORMAT_VERSION + 1),
    ],
)
def test_cache_key_covers_the_worlds_texts(monkeypatch, module, name, value):
    """A changed word, question or template, or a new format version, is a new host."""
    base = cache_key(DigitsConfig())
    monkeypatch.setattr(module, name, value)
    assert cache_key(DigitsConfig()) != base


@pytest.mark.parametrize(
    ("cls", "text", "message"),
    [
        (
            RunConfig,
            '[continual.distill]\naverage_over = "imgae"',
            "continual.distill.average_over: 'imgae' is not one of 'image', 'attended', 'all'",
        ),
        (
            TrainConfig,
            "[continual.distill]\naverage_over = 1",
            "continual.distill.average_over: 1 is not one of 'image', 'attended', 'all'",
        ),
        (
            TrainConfig,
            '[host]\ndtype = "float16"',
            "host.dtype: 'float16' is not one of 'auto', 'float32', 'bfloat16'",
        ),
    ],
)
def test_choices_are_checked_at_load(tmp_path, cls, text, message):
    path = tmp_path / "config.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as error:
        load_toml(cls, path)
    assert str(error.value) == f"{path}: {message}"


@pytest.mark.parametrize(
    ("cls", "section", "key", "value"),
    [
        (RunConfig, "continual.distill", "average_over", "all"),
        (TrainConfig, "continual.distill", "average_over", "attended"),
        (TrainConfig, "host", "dtype", "bfloat16"),
    ],
)
def test_valid_choices_load(tmp_path, cls, section, key, value):
    path = tmp_path / "config.toml"
    path.write_text(f'[{section}]\n{key} = "{value}"\n')
    table = load_toml(cls, path)
    for part in section.split("."):
        table = getattr(table, part)
    assert getattr(table, key) == value


def test_shipped_train_config_is_the_papers_schedule():
    config = load_toml(TrainConfig, ROOT / "configs" / "train-anole.toml")
    train = config.continual.train
    assert (train.epochs, train.lr, train.batch_size, train.grad_clip) == (1, 1e-4, 8, 10.0)
    assert config.continual.distill.weight == 0.3 and config.host.gradient_checkpointing
    assert not config.continual.monitor.enabled  # one process only; this is for 8 GPUs


def test_train_config_tables_are_checked(tmp_path):
    bad = tmp_path / "train.toml"
    bad.write_text("[scoring]\ncolor = 3\n")
    with pytest.raises(
        ConfigError,
        match=r"train\.toml: scoring\.color: 3 is not one of 'exact', 'choice', 'contains'",
    ):
        load_toml(TrainConfig, bad)
    bad.write_text("[host]\nimage_sise = 8\n")
    with pytest.raises(ConfigError, match=r"unknown key 'host\.image_sise'"):
        load_toml(TrainConfig, bad)


def test_split_expert_rank_is_checked_at_load():
    data = {"continual": {"adapter": {"rank": 6, "num_experts": 4, "expert_rank": "split"}}}
    message = r"continual\.adapter: expert_rank 'split' gives each of num_experts 4 experts"
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, data)


def test_a_split_method_takes_its_own_expert_rank_and_is_checked_before_any_work():
    settings = RunConfig().continual
    for name, full in (("mode-split", "mode"), ("moe-lora-split", "moe-lora")):
        split = get_method(name).adapter_config(settings)
        assert split.expert_rank == "split"
        assert split == dataclasses.replace(
            get_method(full).adapter_config(settings), expert_rank="split"
        )
    data = {"methods": ["seq-lora", "mode-split"], "continual": {"adapter": {"rank": 6}}}
    with pytest.raises(
        ConfigError, match=r"method mode-split: expert_rank 'split'.*rank 6 is not divisible"
    ):
        check_methods(data["methods"], from_dict(RunConfig, data).continual)
    data["methods"] = ["seq-lora", "mode"]
    check_methods(data["methods"], from_dict(RunConfig, data).continual)  # full rank 6 builds


def test_a_global_split_divides_the_routed_methods_only():
    data = {"methods": ["seq-lora", "mode"], "continual": {"adapter": {"expert_rank": "split"}}}
    config = from_dict(RunConfig, data)
    check_methods(config.methods, config.continual)  # seq-lora beside mode: mixed kinds
    ranks = {m: get_method(m).adapter_config(config.continual).expert_rank for m in METHOD_NAMES}
    assert {m for m, r in ranks.items() if r == "split"} == {
        "moe-lora",
        "mode",
        "mode-task",
        "mode-sample",
        "mode-no-kd",
        "moe-lora-split",
        "mode-split",
        "cl-moe",  # its experts split the rank whatever the setting, as its code
    }


def test_a_global_split_with_no_routed_method_is_refused_before_any_work(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('[continual.adapter]\nexpert_rank = "split"\n')
    argv = ["bench", "--config", str(config), "--methods", "seq-lora,lwf,mode-text-lora"]
    assert main([*argv, "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err == (
        "modecl: error: continual.adapter.expert_rank 'split' divides the rank among the "
        "experts of a routed branch, and none of the methods seq-lora, lwf, mode-text-lora has "
        "one (with num_experts 4): use 'full'\n"
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
