"""Configuration loading: the shipped config documents the defaults; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from modecl.core.config import ConfigError, load_toml, to_dict
from modecl.digits.config import DigitsConfig, RunConfig
from modecl.hosts.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_equals_the_built_in_defaults():
    assert to_dict(load_toml(RunConfig, ROOT / "configs" / "digits.toml")) == to_dict(RunConfig())


def test_missing_file_and_bad_toml_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: config file not found"):
        load_toml(RunConfig, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[host\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_toml(RunConfig, bad)


def test_cache_key_follows_what_shapes_the_weights():
    base = DigitsConfig()
    assert base.cache_key() == DigitsConfig().cache_key()
    assert DigitsConfig(seed=1).cache_key() != base.cache_key()
    gate_only = DigitsConfig()
    gate_only.gate.captioning = 0.5
    assert gate_only.cache_key() == base.cache_key()


def test_shipped_train_config_is_the_papers_schedule():
    config = load_toml(TrainConfig, ROOT / "configs" / "train-anole.toml")
    train = config.continual.train
    assert (train.epochs, train.lr, train.batch_size, train.grad_clip) == (1, 1e-4, 8, 10.0)
    assert config.continual.distill.weight == 0.3 and config.host.gradient_checkpointing
    assert not config.continual.monitor.enabled  # one process only; this is for 8 GPUs


def test_train_config_tables_are_checked(tmp_path):
    bad = tmp_path / "train.toml"
    bad.write_text("[scoring]\ncolor = 3\n")
    with pytest.raises(ConfigError, match=r"train\.toml: scoring\.color: expected str"):
        load_toml(TrainConfig, bad)
    bad.write_text("[host]\nimage_sise = 8\n")
    with pytest.raises(ConfigError, match=r"unknown key 'host\.image_sise'"):
        load_toml(TrainConfig, bad)
